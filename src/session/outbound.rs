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

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::extract::ws::Message;
use tokio::sync::Notify;

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

#[derive(Default)]
struct State {
    queue: VecDeque<Message>,
    cursors: Vec<(Entity, SessionId, Message)>,
    bytes: usize,
    /// Queued snapshot pages, outside the budget (see the module docs).
    page_bytes: usize,
    overflowed: bool,
    closed: bool,
}

pub struct Outbound {
    state: Mutex<State>,
    notify: Notify,
    max_bytes: usize,
}

/// What the writer takes out in one go.
#[derive(Default)]
pub struct Batch {
    pub messages: VecDeque<Message>,
    pub cursors: Vec<Message>,
}

fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 8,
    }
}

impl Outbound {
    pub fn new(max_bytes: usize) -> Outbound {
        Outbound {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            max_bytes,
        }
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
                self.notify.notify_one();
                return Pushed::Overflow;
            }
        }
        s.bytes += len;
        s.queue.push_back(msg);
        drop(s);
        self.notify.notify_one();
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
        drop(s);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Queues a cursor update, replacing a pending one from the same source in the same room.
    pub fn push_cursor(&self, room: &Entity, source: &SessionId, msg: Message) -> Pushed {
        let len = frame_len(&msg);
        let mut s = self.lock();
        if s.closed || s.overflowed {
            return Pushed::Closed;
        }
        if let Some(slot) = s
            .cursors
            .iter_mut()
            .find(|(r, src, _)| r == room && src == source)
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
        drop(s);
        self.notify.notify_one();
        Pushed::Queued
    }

    /// Drops a pending cursor of `source` (it left the room: its cursor must not reappear).
    pub fn forget_cursor(&self, room: &Entity, source: &SessionId) {
        let mut s = self.lock();
        if let Some(i) = s
            .cursors
            .iter()
            .position(|(r, src, _)| r == room && src == source)
        {
            let (_, _, m) = s.cursors.swap_remove(i);
            s.bytes -= frame_len(&m);
        }
    }

    /// Takes everything queued, swapping in `reuse` (the writer's empty buffer) to keep
    /// allocations out of the steady state.
    pub fn take(&self, reuse: VecDeque<Message>) -> Batch {
        let mut s = self.lock();
        let messages = std::mem::replace(&mut s.queue, reuse);
        let cursors: Vec<Message> = s.cursors.drain(..).map(|(_, _, m)| m).collect();
        s.bytes = 0;
        s.page_bytes = 0;
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
        self.notify.notify_one();
    }

    /// Resolves when something was pushed (or the queue overflowed/closed) since the last take.
    pub async fn ready(&self) {
        self.notify.notified().await
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
        let batch = q.take(VecDeque::new());
        let got: Vec<_> = batch
            .cursors
            .iter()
            .map(|m| m.to_text().unwrap().to_owned())
            .collect();
        assert_eq!(got, ["2", "3"]);
    }

    #[test]
    fn overflow_drops_cursors_first_then_flags_the_session() {
        let q = Outbound::new(10);
        let room = Entity::parse("scene:1").unwrap();
        q.push_cursor(&room, &"a".into(), text("cccccc"));
        assert_eq!(q.push(text("mmmmmm")), Pushed::Queued, "cursor made room");
        assert!(q.take(VecDeque::new()).cursors.is_empty());
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
        let batch = q.take(VecDeque::new());
        assert_eq!(batch.messages.len(), 6, "pages and message, in order");
        assert_eq!(batch.messages[5].to_text().unwrap(), "mmmmmm");
    }

    #[test]
    fn forget_cursor_removes_pending_one() {
        let q = Outbound::new(100);
        let room = Entity::parse("scene:1").unwrap();
        q.push_cursor(&room, &"a".into(), text("1"));
        q.forget_cursor(&room, &"a".into());
        assert!(q.take(VecDeque::new()).cursors.is_empty());
    }
}
