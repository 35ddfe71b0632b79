//! In-process engines: the embedded default for a single node.
//!
//! With no Redis configured, one node runs with these behind the same traits as the Redis
//! engines, and they pass the same [`conformance`](crate::engine::conformance) suite:
//!
//! - [`MemoryLockStore`] ([`locks`]): locks with fencing tokens, FIFO waiters, leases, hold
//!   limits, and audit records for every transition.
//! - [`MemoryPresenceStore`] ([`presence`]): room members and a focus index.
//! - [`MemoryBroker`] ([`broker`]): hands every published event straight back to this node's hub.
//! - [`MemoryResumeStore`] ([`resume`]): sessions parked for a resume.
//! - [`MemoryDocLog`] ([`docs`]): Yjs document update logs.
//!
//! # Why `std::sync::Mutex`
//!
//! Each engine keeps its state behind one `std::sync::Mutex`, not a tokio one: the state is only
//! touched by short, synchronous computations and the guard is never held across an `.await`
//! (a lock store computes the transition and its audit records under the mutex, drops it, and only
//! then awaits the audit sink). A blocking mutex is cheaper than an async one for that, and the
//! compiler enforces the rule: a `std::sync::MutexGuard` is not `Send`, so holding one across an
//! await inside an `async_trait` method does not compile.
//!
//! A poisoned mutex (a panic while it was held, which the code avoids) is reported as
//! [`EngineError::Internal`] rather than propagated as a panic.

pub mod broker;
pub mod docs;
pub mod locks;
pub mod presence;
pub mod resume;

pub use broker::MemoryBroker;
pub use docs::MemoryDocLog;
pub use locks::MemoryLockStore;
pub use presence::MemoryPresenceStore;
pub use resume::MemoryResumeStore;

use std::sync::{Mutex, MutexGuard};

use crate::engine::{EngineError, EngineResult, RoomPage};
use crate::names::Entity;

/// Locks an engine's state, turning poisoning into an engine error instead of a panic.
fn lock_state<'a, T>(m: &'a Mutex<T>, what: &str) -> EngineResult<MutexGuard<'a, T>> {
    m.lock()
        .map_err(|_| EngineError::Internal(format!("{what} state poisoned by an earlier panic")))
}

/// One page of rooms in name order, strictly after `after` (`""`: from the start), at most
/// `count`: the memory stores' [`room_page`](crate::engine::LockStore::room_page). The cursor
/// is the last room name of the page, so rooms created or removed between pages neither shift
/// nor repeat the others. Selecting the page is linear in the rooms (no sort of all of them).
/// `None` when `after` is not a room name.
fn page_by_name<'a>(
    rooms: impl Iterator<Item = (&'a Entity, usize)>,
    after: &str,
    count: usize,
) -> Option<RoomPage> {
    if !after.is_empty() && Entity::parse(after).is_err() {
        return None;
    }
    let count = count.max(1);
    let mut found: Vec<(&Entity, usize)> = rooms
        .filter(|(room, n)| *n > 0 && (after.is_empty() || room.as_str() > after))
        .collect();
    let more = found.len() > count;
    if more {
        found.select_nth_unstable_by(count - 1, |a, b| a.0.cmp(b.0));
        found.truncate(count);
    }
    found.sort_by(|a, b| a.0.cmp(b.0));
    let next = more
        .then(|| found.last().map(|(r, _)| r.to_string()))
        .flatten();
    Some(RoomPage {
        rooms: found.into_iter().map(|(r, n)| (r.clone(), n)).collect(),
        next,
    })
}
