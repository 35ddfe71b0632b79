//! [`MemoryPresenceStore`]: room members and a focus index, in process.
//!
//! - Each room keeps its members by session id plus an order index `(since, session_id)`, so
//!   `members` is oldest first without sorting (ties broken by session id).
//! - The focus index maps an entity to the `(room, session)` pairs focused on it, so
//!   `presence_of` does not scan every room.
//! - A room whose last member leaves and a focus entry with no sessions left are removed: memory
//!   follows the live members, not the churn.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::lock_state;
use crate::engine::{
    EngineError, EngineResult, Member, PresencePatch, PresenceStore, RoomPage, SessionId,
};
use crate::names::Entity;

/// The in-process [`PresenceStore`].
pub struct MemoryPresenceStore {
    state: Mutex<State>,
    /// Members one room may have; joins past it get [`EngineError::RoomFull`].
    max_members: usize,
}

impl Default for MemoryPresenceStore {
    fn default() -> Self {
        MemoryPresenceStore {
            state: Mutex::default(),
            max_members: usize::MAX,
        }
    }
}

impl MemoryPresenceStore {
    pub fn new() -> MemoryPresenceStore {
        MemoryPresenceStore::default()
    }

    /// Caps the members of each room (`LOCKSTEP_MAX_MEMBERS_PER_ROOM`).
    pub fn with_max_members(mut self, max: usize) -> MemoryPresenceStore {
        self.max_members = max;
        self
    }

    fn state(&self) -> EngineResult<std::sync::MutexGuard<'_, State>> {
        lock_state(&self.state, "presence store")
    }
}

#[derive(Default)]
struct State {
    rooms: HashMap<Entity, Room>,
    /// Focused entity → `(room, session)` of the members focused on it.
    focus: HashMap<Entity, HashSet<(Entity, SessionId)>>,
}

#[derive(Default)]
struct Room {
    members: HashMap<SessionId, Member>,
    order: BTreeSet<(u64, SessionId)>,
}

impl Room {
    fn ordered(&self) -> impl Iterator<Item = &Member> {
        self.order.iter().filter_map(|(_, s)| self.members.get(s))
    }
}

impl State {
    fn focus_add(&mut self, room: &Entity, m: &Member) {
        if let Some(f) = &m.focus {
            self.focus
                .entry(f.clone())
                .or_default()
                .insert((room.clone(), m.session_id.clone()));
        }
    }

    fn focus_remove(&mut self, room: &Entity, m: &Member) {
        if let Some(f) = &m.focus
            && let Some(set) = self.focus.get_mut(f)
        {
            set.remove(&(room.clone(), m.session_id.clone()));
            if set.is_empty() {
                self.focus.remove(f);
            }
        }
    }

    /// Removes a member from its room (dropping the room when empty) and from the focus index.
    fn remove(&mut self, room: &Entity, session_id: &SessionId) -> Option<Member> {
        let r = self.rooms.get_mut(room)?;
        let old = r.members.remove(session_id)?;
        r.order.remove(&(old.since, session_id.clone()));
        if r.members.is_empty() {
            self.rooms.remove(room);
        }
        self.focus_remove(room, &old);
        Some(old)
    }

    fn insert(&mut self, room: &Entity, m: Member) {
        self.focus_add(room, &m);
        let r = self.rooms.entry(room.clone()).or_default();
        r.order.insert((m.since, m.session_id.clone()));
        r.members.insert(m.session_id.clone(), m);
    }
}

#[async_trait]
impl PresenceStore for MemoryPresenceStore {
    async fn join(&self, room: &Entity, member: Member) -> EngineResult<Option<Member>> {
        let mut st = self.state()?;
        let (present, count) = st.rooms.get(room).map_or((false, 0), |r| {
            (r.members.contains_key(&member.session_id), r.members.len())
        });
        if !present && count >= self.max_members {
            return Err(EngineError::RoomFull(self.max_members));
        }
        let old = st.remove(room, &member.session_id);
        st.insert(room, member);
        Ok(old)
    }

    async fn update(
        &self,
        room: &Entity,
        session_id: &SessionId,
        patch: PresencePatch,
    ) -> EngineResult<Option<Member>> {
        let mut st = self.state()?;
        let Some(mut m) = st.remove(room, session_id) else {
            return Ok(None);
        };
        if let Some(focus) = patch.focus {
            m.focus = focus;
        }
        if let Some(state) = patch.state {
            m.state = state;
        }
        st.insert(room, m.clone());
        Ok(Some(m))
    }

    async fn leave(&self, room: &Entity, session_id: &SessionId) -> EngineResult<Option<Member>> {
        Ok(self.state()?.remove(room, session_id))
    }

    async fn members(&self, room: &Entity) -> EngineResult<Vec<Member>> {
        let st = self.state()?;
        Ok(st
            .rooms
            .get(room)
            .map(|r| r.ordered().cloned().collect())
            .unwrap_or_default())
    }

    /// Members of the room `entity` first (oldest first), then members of other rooms focused
    /// on it (oldest first); a session in several of those appears once, with its first entry.
    async fn presence_of(&self, entity: &Entity) -> EngineResult<Vec<Member>> {
        let st = self.state()?;
        let mut seen: HashSet<SessionId> = HashSet::new();
        let mut out: Vec<Member> = Vec::new();
        if let Some(r) = st.rooms.get(entity) {
            for m in r.ordered() {
                if seen.insert(m.session_id.clone()) {
                    out.push(m.clone());
                }
            }
        }
        let mut focused: Vec<&Member> = st
            .focus
            .get(entity)
            .into_iter()
            .flatten()
            .filter_map(|(room, s)| st.rooms.get(room)?.members.get(s))
            .collect();
        focused.sort_by(|a, b| (a.since, &a.session_id).cmp(&(b.since, &b.session_id)));
        for m in focused {
            if seen.insert(m.session_id.clone()) {
                out.push(m.clone());
            }
        }
        Ok(out)
    }

    async fn room_page(&self, after: &str, count: usize) -> EngineResult<Option<RoomPage>> {
        let st = self.state()?;
        let rooms = st.rooms.iter().map(|(r, room)| (r, room.members.len()));
        Ok(super::page_by_name(rooms, after, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn member(session: &str, since: u64, focus: Option<&str>) -> Member {
        Member {
            user_id: "u".into(),
            session_id: session.into(),
            name: "U".into(),
            avatar: None,
            color: "#000".into(),
            role: Role::Editor,
            focus: focus.map(|f| Entity::parse(f).unwrap()),
            state: None,
            since,
        }
    }

    /// Past the cap a new session is refused and nothing changes; members already in the
    /// room may still rejoin (replace themselves), and a leave makes room again.
    #[tokio::test]
    async fn members_are_capped_per_room() {
        let store = MemoryPresenceStore::new().with_max_members(2);
        let room = Entity::parse("scene:1").unwrap();
        store.join(&room, member("a", 1, None)).await.unwrap();
        store.join(&room, member("b", 2, None)).await.unwrap();
        let full = store.join(&room, member("c", 3, None)).await;
        assert!(matches!(full, Err(EngineError::RoomFull(2))), "{full:?}");
        assert_eq!(store.members(&room).await.unwrap().len(), 2);
        store
            .join(&room, member("b", 2, None))
            .await
            .expect("rejoin");
        let other = Entity::parse("scene:2").unwrap();
        store
            .join(&other, member("c", 3, None))
            .await
            .expect("per room");
        store.leave(&room, &"a".into()).await.unwrap();
        store
            .join(&room, member("c", 3, None))
            .await
            .expect("room again");
    }

    /// Joins, focus changes and leaves leave no empty rooms or focus entries behind.
    #[tokio::test]
    async fn maps_are_emptied_by_churn() {
        let store = MemoryPresenceStore::new();
        let rooms: Vec<Entity> = (0..10)
            .map(|i| Entity::parse(&format!("scene:{i}")).unwrap())
            .collect();
        for (i, room) in rooms.iter().enumerate() {
            let s = format!("s{i}");
            store
                .join(room, member(&s, i as u64, Some("segment:1")))
                .await
                .unwrap();
            let patch = PresencePatch {
                focus: Some(Some(Entity::parse("segment:2").unwrap())),
                state: None,
            };
            store.update(room, &s.as_str().into(), patch).await.unwrap();
            store
                .join(room, member(&s, i as u64, Some("segment:3")))
                .await
                .unwrap();
        }
        for (i, room) in rooms.iter().enumerate() {
            store.leave(room, &format!("s{i}").into()).await.unwrap();
        }
        let st = store.state.lock().unwrap();
        assert!(st.rooms.is_empty());
        assert!(st.focus.is_empty());
    }
}
