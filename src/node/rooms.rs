//! Rooms: join, leave, presence updates, cursors, broadcasts and snapshots.

use std::sync::Arc;

use super::{Node, OpError};
use crate::auth::Role;
use crate::engine::{Member, PresencePatch, ReleaseReason, RoomEventKind};
use crate::names::Entity;
use crate::protocol::codec::json_len_within;
use crate::protocol::server::LockView;
use crate::protocol::snapshot::snapshot_frames;
use crate::session::handle::SessionHandle;

impl Node {
    /// Joins `room` (or updates `state` when already joined) and sends the joiner a snapshot.
    pub async fn join(
        &self,
        handle: &Arc<SessionHandle>,
        room: &Entity,
        state: Option<serde_json::Value>,
    ) -> Result<(), OpError> {
        let principal = &handle.principal;
        let Some(role) = principal.role_in(room) else {
            return Err(self.forbidden(principal, room, "joining").await);
        };
        if let Some(state) = &state {
            self.check_json_size("state", state, self.config.max_presence_state_bytes)?;
        }
        if handle.is_joined(room) {
            if let Some(state) = state {
                let patch = PresencePatch {
                    focus: None,
                    state: Some(Some(state)),
                };
                self.update_presence(handle, room, patch).await?;
            }
            return self.send_snapshot(handle, room).await;
        }
        let max = self.config.max_rooms_per_session;
        if handle.room_count() >= max {
            return Err(OpError::TooManyRooms(max));
        }
        // Local membership first, so no event published from here on is missed; the snapshot
        // below then covers everything before.
        handle.add_room(room);
        self.hub.join_room(room, handle);
        let member = Member::joining(principal, handle.id.clone(), role, state);
        let joined = async {
            self.sync_subscription(room).await?;
            self.presence.join(room, member.clone()).await
        };
        if let Err(e) = joined.await {
            handle.remove_room(room);
            self.hub.leave_room(room, &handle.id);
            let _ = self.sync_subscription(room).await;
            return Err(e.into());
        }
        handle.set_member(room, member.clone());
        self.metrics.joined();
        self.publish(room, Some(&handle.id), RoomEventKind::PresenceJoin(member))
            .await;
        self.send_snapshot(handle, room).await
    }

    /// Leaves `room`: presence leaves, and the session's locks and waits there are released.
    pub async fn leave(&self, handle: &Arc<SessionHandle>, room: &Entity) -> Result<(), OpError> {
        if !handle.remove_room(room) {
            return Err(OpError::NotInRoom(room.clone()));
        }
        // Release and announce while the session still receives the room's events, so it
        // sees its own locks go and no hand-off to it slips by unseen.
        self.leave_everywhere(handle, std::slice::from_ref(room), ReleaseReason::Released)
            .await;
        self.hub.leave_room(room, &handle.id);
        self.sync_subscription(room).await?;
        Ok(())
    }

    /// Lock release and presence leave in `rooms`, for `leave` and resumed sessions that lost
    /// access to a room.
    pub(super) async fn leave_everywhere(
        &self,
        handle: &SessionHandle,
        rooms: &[Entity],
        reason: ReleaseReason,
    ) {
        match self
            .locks
            .release_session(&handle.id, reason, Some(rooms))
            .await
        {
            Ok(transitions) => {
                for t in transitions {
                    self.announce(t).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, session = %handle.id, "releasing session locks failed")
            }
        }
        self.leave_presence(handle, rooms).await;
    }

    /// Removes the session from the rooms' presence and announces `presence.leave`.
    pub(super) async fn leave_presence(&self, handle: &SessionHandle, rooms: &[Entity]) {
        for room in rooms {
            match self.presence.leave(room, &handle.id).await {
                Ok(Some(member)) => {
                    self.publish(room, Some(&handle.id), RoomEventKind::PresenceLeave(member))
                        .await
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, %room, "presence leave failed"),
            }
        }
    }

    pub async fn update_presence(
        &self,
        handle: &SessionHandle,
        room: &Entity,
        patch: PresencePatch,
    ) -> Result<(), OpError> {
        if !handle.is_joined(room) {
            return Err(OpError::NotInRoom(room.clone()));
        }
        if let Some(Some(state)) = &patch.state {
            self.check_json_size("state", state, self.config.max_presence_state_bytes)?;
        }
        // The member as this session last wrote it lets the store skip reading it first.
        let known = handle
            .members()
            .into_iter()
            .find_map(|(r, m)| (r == *room).then_some(m));
        if let Some(member) = self
            .presence
            .update_known(room, &handle.id, patch, known.as_ref())
            .await?
        {
            handle.set_member(room, member.clone());
            self.publish(
                room,
                Some(&handle.id),
                RoomEventKind::PresenceUpdate(member),
            )
            .await;
        }
        Ok(())
    }

    /// Fans out a cursor position; silently dropped when the session does not share cursors.
    pub async fn cursor(
        &self,
        handle: &SessionHandle,
        room: &Entity,
        x: f64,
        y: f64,
        selection: Option<serde_json::Value>,
    ) -> Result<(), OpError> {
        if !handle.is_joined(room) {
            return Err(OpError::NotInRoom(room.clone()));
        }
        if let Some(selection) = &selection {
            self.check_json_size("selection", selection, self.config.max_presence_state_bytes)?;
        }
        if !handle.share_cursor() {
            return Ok(());
        }
        let kind = RoomEventKind::Cursor {
            user_id: handle.principal.user_id.clone(),
            session_id: handle.id.clone(),
            x,
            y,
            selection,
        };
        self.publish(room, Some(&handle.id), kind).await;
        Ok(())
    }

    /// Fans out an app event to the other members; commenters and above may broadcast.
    pub async fn broadcast(
        &self,
        handle: &SessionHandle,
        room: &Entity,
        event: Arc<str>,
        data: serde_json::Value,
    ) -> Result<(), OpError> {
        if !handle.is_joined(room) {
            return Err(OpError::NotInRoom(room.clone()));
        }
        if handle.principal.role_in(room) < Some(Role::Commenter) {
            return Err(self
                .forbidden(&handle.principal, room, "broadcasting")
                .await);
        }
        self.check_json_size("data", &data, self.config.max_broadcast_bytes)?;
        let kind = RoomEventKind::Broadcast {
            event,
            data,
            user_id: handle.principal.user_id.clone(),
            session_id: handle.id.clone(),
            name: handle.principal.name.clone(),
        };
        self.publish(room, Some(&handle.id), kind).await;
        Ok(())
    }

    /// Sends `room.snapshot`: every member and lock of the room, with tokens of this
    /// session's own locks. Room events arriving while it is built are held back and sent
    /// after it, so an older snapshot never overwrites a newer event on the client.
    pub async fn send_snapshot(
        &self,
        handle: &SessionHandle,
        room: &Entity,
    ) -> Result<(), OpError> {
        handle.begin_snapshot(room);
        let state = async {
            let members = self.presence.members(room).await?;
            let locks = self.locks.list_room(room).await?;
            Ok::<_, OpError>((members, locks))
        };
        let (members, locks) = match state.await {
            Ok(s) => s,
            Err(e) => {
                handle.cancel_snapshot(room);
                return Err(e);
            }
        };
        for lock in &locks {
            if lock.holder.session_id == handle.id {
                handle.hold(&lock.room, &lock.resource, lock.token);
            }
        }
        let views: Vec<LockView<'_>> = locks.iter().map(|l| LockView::of(l, &handle.id)).collect();
        let mut frames = snapshot_frames(
            handle.codec,
            room,
            &members,
            &views,
            self.snapshot_page_bytes(),
        );
        let Some(last) = frames.pop() else {
            handle.cancel_snapshot(room);
            return Ok(());
        };
        // Earlier pages are queued outside the slow-consumer budget (they are bounded by the
        // room caps); room events stay held back until the last page.
        for page in frames {
            handle.queue_snapshot_page(page);
        }
        handle.finish_snapshot_encoded(room, last);
        Ok(())
    }

    /// The byte budget of one snapshot frame: half the largest frame a client may send, far
    /// below the socket's write buffer limit (4 KiB + twice that setting), and at most a
    /// quarter of the outbound queue, so the last page (which is budgeted) always fits it.
    fn snapshot_page_bytes(&self) -> usize {
        (self.config.max_frame_bytes / 2)
            .min(self.config.max_queue_bytes / 4)
            .max(1024)
    }

    /// `too_large` when `value` encodes to more than `max` bytes of JSON. Measured as JSON
    /// because that is how it is stored and re-sent to JSON clients: a MessagePack string of
    /// control characters grows about six times when escaped.
    fn check_json_size(
        &self,
        what: &str,
        value: &serde_json::Value,
        max: usize,
    ) -> Result<(), OpError> {
        match json_len_within(value, max) {
            Some(_) => Ok(()),
            None => Err(OpError::TooLarge(format!(
                "{what} is over {max} bytes encoded as JSON"
            ))),
        }
    }
}
