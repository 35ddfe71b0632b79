//! A session's outbound queue, bounded in bytes.
//!
//! Producers (the hub's fan-out, the session's own replies) push without waiting; the
//! session's writer drains. Cursor updates are kept apart, one slot per (room, source session):
//! a newer cursor replaces the pending one (latest wins), so a slow reader loses stale cursors
//! first. When the queue still exceeds its byte budget, the pending cursors are dropped; if
//! that is not enough the queue is marked overflowed and the session is closed with
//! `4008 slow_consumer` — nothing is silently lost for a client that stays connected.
//!
//! Pages of a large `room.snapshot` (all but its last) are queued outside the byte budget:
//! they are bounded by the room caps (members × state size), not by the reader's speed, and
//! counting them would close every slow-ish joiner of a full room as a slow consumer before
//! it could read the room — the room would be unjoinable for it. Whatever follows the
//! snapshot is budgeted as usual.
//!
//! A `std::sync::Mutex` guards the state: it is held for a few pointer moves, never across an
//! `.await`, and producers must not yield in the middle of a fan-out loop.
//!
//! Wake-ups are the cost of fan-out (one per delivery at low rates), so the writer is woken
//! only when its queue goes from taken to non-empty: pushes that land while it has not yet
//! taken the previous ones add no wake-up. The reasons a session must end at once (overflow,
//! revocation, takeover) are [`Signal`]s on the same wake-up, not cancellation tokens the
//! writer would have to register with on every turn of its loop.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tungstenite::Message;

use crate::engine::SessionId;
use crate::names::Entity;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// A pending cursor from the same source was replaced.
    Replaced,
    /// Over budget: the session must be closed as a slow consumer.
    Overflow,
    /// The queue is closed (session ending); the message was not queued.
    Closed,
}

/// A pending cursor: its room, its source session and the encoded frame.
pub type CursorSlot = (Entity, SessionId, Message);

#[derive(Default)]
struct State {
    queue: VecDeque<Message>,
    cursors: Vec<CursorSlot>,
    bytes: usize,
    /// Queued snapshot pages, outside the budget (see the module docs).
    page_bytes: usize,
    overflowed: bool,
    closed: bool,
    /// The writer was woken for what is queued and has not taken it yet.
    signalled: bool,
}

/// Why a session must end now, as bits of [`Wake::ends`].
pub const END_KILL: u8 = 1;
pub const END_REVOKED: u8 = 2;
pub const END_TAKEOVER: u8 = 4;

/// What wakes a session's writer: something queued, or a reason to end.
#[derive(Default)]
struct Wake {
    /// Something was queued (or the session must end).
    ready: Notify,
    /// The session must end: wakes a writer blocked in a write.
    end: Notify,
    ends: AtomicU8,
}

/// One reason to end a session now (see [`END_KILL`] and its siblings): raised once, by
/// anyone holding the session's handle; the writer sees it at its next turn, or in a write.
pub struct Signal {
    wake: Arc<Wake>,
    bit: u8,
}

impl Signal {
    /// Raises the signal (idempotent).
    pub fn cancel(&self) {
        self.wake.ends.fetch_or(self.bit, Ordering::AcqRel);
        self.wake.ready.notify_one();
        self.wake.end.notify_one();
    }

    pub fn is_cancelled(&self) -> bool {
        self.wake.ends.load(Ordering::Acquire) & self.bit != 0
    }
}

pub struct Outbound {
    state: Mutex<State>,
    wake: Arc<Wake>,
    max_bytes: usize,
}

/// What the writer takes out in one go. Give it back to [`Outbound::take`] once written, so
/// its buffers are reused.
#[derive(Default)]
pub struct Batch {
    pub messages: VecDeque<Message>,
    pub cursors: Vec<CursorSlot>,
}

/// Buffer capacity (in frames) a writer keeps between batches: a burst (99 `presence.join`s
/// into a room of 100) must not leave every idle member holding its capacity.
const KEEP_FRAMES: usize = 16;

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.cursors.is_empty()
    }

    /// Empties the batch for reuse, dropping buffers a burst grew.
    pub fn recycle(&mut self) {
        self.messages.clear();
        self.cursors.clear();
        if self.messages.capacity() > KEEP_FRAMES {
            self.messages = VecDeque::new();
        }
        if self.cursors.capacity() > KEEP_FRAMES {
            self.cursors = Vec::new();
        }
    }
}

fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 8,
    }
}

/// Equal session ids, by pointer when they are the same allocation (the common case: the
/// source's own handle id), by content otherwise.
fn same(a: &SessionId, b: &SessionId) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

impl Outbound {
    pub fn new(max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            wake: Arc::new(Wake::default()),
            max_bytes,
        }
    }

    /// A new end signal of this queue's writer (`bit` is one of [`END_KILL`] and siblings).
    pub fn signal(&self, bit: u8) -> Signal {
        Signal {
            wake: self.wake.clone(),
            bit,
        }
    }

    /// The end signals raised so far (0: none).
    pub fn ends(&self) -> u8 {
        self.wake.ends.load(Ordering::Acquire)
    }

    /// Resolves once an end signal is raised (at once if one already is).
    pub async fn end_signalled(&self) -> u8 {
        loop {
            let ends = self.ends();
            if ends != 0 {
                return ends;
            }
            self.wake.end.notified().await;
        }
    }

    /// Wakes the writer unless it was already woken for what it has not taken.
    fn wake_writer(&self, mut s: std::sync::MutexGuard<'_, State>) {
        if s.signalled {
            return;
        }
        s.signalled = true;
        drop(s);
        self.wake.ready.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent (plain moves),
        // so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message that must arrive (replies, presence, lock events).
    pub fn push(&self, msg: Message) -> Pushed {
        let len = frame_len(&msg);
        let mut s = self.lock();
        if s.closed || s.overflowed {
            return Pushed::Closed;
        }
        if s.bytes + len > self.max_bytes {
            let freed: usize = s.cursors.drain(..).map(|(_, _, m)| frame_len(&m)).sum();
            s.bytes -= freed;
            if s.bytes + len > self.max_bytes {
                s.overflowed = true;
                drop(s);
                self.wake.ready.notify_one();
                return Pushed::Overflow;
            }
        }
        s.bytes += len;
        s.queue.push_back(msg);
        self.wake_writer(s);
        Pushed::Queued
    }

    /// Queues a page of a paged `room.snapshot` (not its last), outside the byte budget.
    pub fn push_snapshot_page(&self, msg: Message) -> Pushed {
        let len = frame_len(&msg);
        let mut s = self.lock();
        if s.closed || s.overflowed {
            return Pushed::Closed;
        }
        s.page_bytes += len;
        s.queue.push_back(msg);
        self.wake_writer(s);
        Pushed::Queued
    }

    /// Queues a cursor update, replacing a pending one from the same source in the same room.
    pub fn push_cursor(&self, room: &Entity, source: &SessionId, msg: Message) -> Pushed {
        let len = frame_len(&msg);
        let mut s = self.lock();
        if s.closed || s.overflowed {
            return Pushed::Closed;
        }
        // Source first: session ids differ in their first bytes, while the rooms of one
        // session's pending cursors share a long prefix (or are all the same room).
        if let Some(slot) = s
            .cursors
            .iter_mut()
            .find(|(r, src, _)| same(src, source) && r == room)
        {
            let old = std::mem::replace(&mut slot.2, msg);
            s.bytes = s.bytes - frame_len(&old) + len;
            return Pushed::Replaced;
        }
        if s.bytes + len > self.max_bytes {
            // Cursors are the first thing a slow reader loses; this one is dropped too.
            return Pushed::Replaced;
        }
        s.bytes += len;
        s.cursors.push((room.clone(), source.clone(), msg));
        self.wake_writer(s);
        Pushed::Queued
    }

    /// Drops a pending cursor of `source` (it left the room: its cursor must not reappear).
    pub fn forget_cursor(&self, room: &Entity, source: &SessionId) {
        let mut s = self.lock();
        if let Some(i) = s
            .cursors
            .iter()
            .position(|(r, src, _)| same(src, source) && r == room)
        {
            let (_, _, m) = s.cursors.swap_remove(i);
            s.bytes -= frame_len(&m);
        }
    }

    /// Takes everything queued, swapping in `reuse` (the writer's emptied batch) to keep
    /// allocations out of the steady state.
    pub fn take(&self, mut reuse: Batch) -> Batch {
        reuse.recycle();
        let mut s = self.lock();
        let messages = std::mem::replace(&mut s.queue, reuse.messages);
        let cursors = std::mem::replace(&mut s.cursors, reuse.cursors);
        s.bytes = 0;
        s.page_bytes = 0;
        s.signalled = false;
        Batch { messages, cursors }
    }

    /// Bytes waiting to be written; 0 once closed or overflowed (nothing more will be sent).
    pub fn queued_bytes(&self) -> usize {
        let s = self.lock();
        if s.closed || s.overflowed {
            0
        } else {
            s.bytes + s.page_bytes
        }
    }

    /// True once the queue is closed or overflowed (nothing more will be sent).
    pub fn is_closed(&self) -> bool {
        let s = self.lock();
        s.closed || s.overflowed
    }

    /// Refuses further pushes (the session is ending).
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.ready.notify_one();
    }

    /// Resolves when something was pushed (or the queue overflowed/closed, or an end signal
    /// was raised) since the last take. May resolve with nothing to take.
    pub async fn ready(&self) {
        self.wake.ready.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.to_owned().into())
    }

    #[test]
    fn cursors_are_latest_wins_per_source() {
        let q = Outbound::new(1024);
        let room = Entity::parse("scene:1").unwrap();
        let a: SessionId = "a".into();
        assert_eq!(q.push_cursor(&room, &a, text("1")), Pushed::Queued);
        assert_eq!(q.push_cursor(&room, &a, text("2")), Pushed::Replaced);
        assert_eq!(q.push_cursor(&room, &"b".into(), text("3")), Pushed::Queued);
        let batch = q.take(Batch::default());
        let got: Vec<_> = batch
            .cursors
            .iter()
            .map(|(_, _, m)| m.to_text().unwrap().to_owned())
            .collect();
        assert_eq!(got, ["2", "3"]);
    }

    #[test]
    fn overflow_drops_cursors_first_then_flags_the_session() {
        let q = Outbound::new(10);
        let room = Entity::parse("scene:1").unwrap();
        q.push_cursor(&room, &"a".into(), text("cccccc"));
        assert_eq!(q.push(text("mmmmmm")), Pushed::Queued, "cursor made room");
        assert!(q.take(Batch::default()).cursors.is_empty());
        assert_eq!(q.push(text("mmmmmm")), Pushed::Queued);
        assert_eq!(q.push(text("mmmmmm")), Pushed::Overflow);
        assert!(q.is_closed());
        assert_eq!(q.push(text("x")), Pushed::Closed);
    }

    #[test]
    fn snapshot_pages_do_not_count_against_the_budget() {
        let q = Outbound::new(10);
        for _ in 0..5 {
            assert_eq!(q.push_snapshot_page(text("pppppppp")), Pushed::Queued);
        }
        assert_eq!(
            q.push(text("mmmmmm")),
            Pushed::Queued,
            "the budget is untouched"
        );
        assert_eq!(q.queued_bytes(), 46);
        let batch = q.take(Batch::default());
        assert_eq!(batch.messages.len(), 6, "pages and message, in order");
        assert_eq!(batch.messages[5].to_text().unwrap(), "mmmmmm");
    }

    #[test]
    fn forget_cursor_removes_pending_one() {
        let q = Outbound::new(100);
        let room = Entity::parse("scene:1").unwrap();
        q.push_cursor(&room, &"a".into(), text("1"));
        q.forget_cursor(&room, &"a".into());
        assert!(q.take(Batch::default()).cursors.is_empty());
    }

    #[tokio::test]
    async fn the_writer_is_woken_once_per_taken_batch() {
        let q = Outbound::new(1024);
        let room = Entity::parse("scene:1").unwrap();
        q.push(text("a"));
        q.push(text("b"));
        q.push_cursor(&room, &"s".into(), text("c"));
        // One wake-up for the three pushes: its permit is consumed, and no second one waits.
        q.ready().await;
        let batch = q.take(Batch::default());
        assert_eq!((batch.messages.len(), batch.cursors.len()), (2, 1));
        let second = tokio::time::timeout(std::time::Duration::from_millis(20), q.ready());
        assert!(second.await.is_err(), "no wake-up without a new push");
        q.push(text("d"));
        q.ready().await;
        assert_eq!(
            q.take(batch).messages.len(),
            1,
            "the batch's buffers are reused"
        );
    }

    #[tokio::test]
    async fn an_end_signal_wakes_the_writer_and_a_blocked_write() {
        let q = Outbound::new(1024);
        let takeover = q.signal(END_TAKEOVER);
        assert_eq!(q.ends(), 0);
        takeover.cancel();
        assert!(takeover.is_cancelled());
        q.ready().await;
        assert_eq!(q.end_signalled().await, END_TAKEOVER);
        q.signal(END_KILL).cancel();
        assert_eq!(q.ends(), END_TAKEOVER | END_KILL);
    }

    #[test]
    fn a_burst_does_not_leave_its_capacity_behind() {
        let q = Outbound::new(1 << 20);
        for _ in 0..100 {
            q.push(text("presence.join"));
        }
        let mut batch = q.take(Batch::default());
        assert_eq!(batch.messages.len(), 100);
        batch.recycle();
        assert!(batch.messages.capacity() <= KEEP_FRAMES);
    }
}
