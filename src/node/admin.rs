//! What the operator console reads (`GET /v1/admin/rooms`, `GET /v1/admin/nodes`): the live
//! rooms cluster-wide with member and lock counts, paged, and the live nodes with their
//! session counts.
//!
//! Rooms are iterated through the stores' own cursors ([`PresenceStore::room_page`] then
//! [`LockStore::room_page`]), so a page costs a bounded number of engine steps however many
//! rooms exist. A room with members is listed in the first phase; a room with locks but no
//! members (HTTP locks) in the second.
//!
//! [`PresenceStore::room_page`]: crate::engine::PresenceStore::room_page
//! [`LockStore::room_page`]: crate::engine::LockStore::room_page

use serde::{Deserialize, Serialize};

use super::{Node, OpError};
use crate::auth::{Principal, Role, RoomPattern};
use crate::engine::now_ms;
use crate::names::Entity;

/// Engine steps one request may take. A page can come back short (even empty, with `next`)
/// when the steps ran out: the client asks again from `next`. With the 16 Redis lock shards
/// plus the presence index, a small deployment is listed in one request.
const MAX_STEPS: usize = 24;
/// Rooms one request may examine, as a multiple of its `limit`: each costs reads (its members,
/// its locks — 16 shard reads with Redis), and an owner's filtered walk may examine many rooms
/// it does not see, so this bounds a request's work whatever the rooms are.
const EXAMINED_PER_LIMIT: usize = 2;
/// Nodes listed at most (the node set is small; this only bounds a runaway set).
pub const MAX_NODES: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct RoomSummary {
    pub room: Entity,
    pub members: usize,
    pub locks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct RoomsPage {
    pub rooms: Vec<RoomSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A node as the listing shows it; also what the node writes into its liveness key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    /// Sessions with a live socket on this node.
    pub attached: usize,
    /// Sessions this node parked, waiting for a resume.
    pub parked: usize,
    /// Rooms with at least one attached member on this node.
    pub rooms: usize,
    pub draining: bool,
    /// When the node wrote this (ms): at most a second or two old for a live node.
    pub at: u64,
}

/// Which rooms a caller may see in the listing.
enum Scope {
    All,
    /// Owner through a `type:*` or `*` pattern: rooms are scanned and filtered by role.
    Filtered,
    /// Owner of these rooms only (exact patterns): they are looked up, not scanned.
    Exact(Vec<Entity>),
}

fn scope(who: &Principal) -> Option<Scope> {
    if who.admin {
        return Some(Scope::All);
    }
    let grants = who.grants();
    let owner = |r: &Role| *r == Role::Owner;
    if grants
        .rooms
        .iter()
        .any(|(p, r)| owner(r) && !matches!(p, RoomPattern::Exact(_)))
    {
        return Some(Scope::Filtered);
    }
    let mut exact: Vec<Entity> = grants
        .rooms
        .iter()
        .filter_map(|(p, r)| match p {
            RoomPattern::Exact(room) if owner(r) => Entity::parse(room).ok(),
            _ => None,
        })
        .collect();
    exact.sort();
    exact.dedup();
    (!exact.is_empty()).then_some(Scope::Exact(exact))
}

/// Whether `who` may use the room listing at all: the admin token or an owner of some room.
pub fn may_list_rooms(who: &Principal) -> bool {
    scope(who).is_some()
}

impl Node {
    /// This node's status, as the node listing shows it.
    pub fn status(&self) -> NodeStatus {
        let all = self.hub.sessions().len();
        let attached = self.hub.attached().len();
        NodeStatus {
            node_id: self.id.to_string(),
            attached,
            parked: all.saturating_sub(attached),
            rooms: self.hub.room_count(),
            draining: !self.is_ready(),
            at: now_ms(),
        }
    }

    /// The live nodes: every node with a liveness key (Redis), or just this one (embedded).
    /// This node's entry is always its current status, not its last beat.
    pub async fn list_nodes(&self) -> Result<Vec<NodeStatus>, OpError> {
        let Some(registry) = self.revocations.get() else {
            return Ok(vec![self.status()]);
        };
        let listed = registry.list(MAX_NODES).await?;
        let mut out: Vec<NodeStatus> = listed
            .into_iter()
            .filter(|(id, _)| *id != *self.id)
            .map(|(id, status)| {
                serde_json::from_str::<NodeStatus>(&status).unwrap_or(NodeStatus {
                    // A node of an older version beats "1": alive, counts unknown.
                    node_id: id,
                    attached: 0,
                    parked: 0,
                    rooms: 0,
                    draining: false,
                    at: 0,
                })
            })
            .collect();
        out.push(self.status());
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(out)
    }

    /// One page of the live rooms `who` may see (the admin token: all; an owner: those it
    /// owns), about `limit` of them, sorted by name within the page. `cursor` is `None` to
    /// start or the `next` of the previous page; `None` is returned when it is not one.
    pub async fn list_rooms(
        &self,
        who: &Principal,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Option<RoomsPage>, OpError> {
        let Some(scope) = scope(who) else {
            return Err(OpError::Forbidden(
                "listing rooms needs the admin token or an owner's token".into(),
            ));
        };
        if let Scope::Exact(rooms) = scope {
            // Bounded by the token's own size: one page, no cursor.
            if cursor.is_some() {
                return Ok(None);
            }
            let mut out = Vec::new();
            for room in rooms {
                let members = self.presence.members(&room).await?.len();
                let locks = self.locks.list_room(&room).await?.len();
                if members + locks > 0 {
                    out.push(RoomSummary {
                        room,
                        members,
                        locks,
                    });
                }
            }
            return Ok(Some(RoomsPage {
                rooms: out,
                next: None,
            }));
        }
        let visible = |room: &Entity| who.role_in(room) == Some(Role::Owner);
        // The public cursor is `p.<presence cursor>` or `l.<lock cursor>`.
        let (mut in_locks, mut inner) = match cursor {
            None => (false, String::new()),
            Some(c) => match c.split_once('.') {
                Some(("p", rest)) => (false, rest.to_owned()),
                Some(("l", rest)) => (true, rest.to_owned()),
                _ => return Ok(None),
            },
        };
        let mut out = Vec::new();
        let mut next = Some(());
        let mut examined = 0;
        for _ in 0..MAX_STEPS {
            let want = limit.saturating_sub(out.len()).max(1);
            if !in_locks {
                let Some(page) = self.presence.room_page(&inner, want).await? else {
                    return Ok(None);
                };
                examined += page.rooms.len();
                for (room, members) in page.rooms {
                    if visible(&room) {
                        let locks = self.locks.list_room(&room).await?.len();
                        out.push(RoomSummary {
                            room,
                            members,
                            locks,
                        });
                    }
                }
                match page.next {
                    Some(n) => inner = n,
                    None => {
                        in_locks = true;
                        inner = String::new();
                    }
                }
            } else {
                let Some(page) = self.locks.room_page(&inner, want).await? else {
                    return Ok(None);
                };
                examined += page.rooms.len();
                for (room, locks) in page.rooms {
                    // Rooms with members were listed in the first phase.
                    if visible(&room) && self.presence.members(&room).await?.is_empty() {
                        out.push(RoomSummary {
                            room,
                            members: 0,
                            locks,
                        });
                    }
                }
                match page.next {
                    Some(n) => inner = n,
                    None => {
                        next = None;
                        break;
                    }
                }
            }
            if out.len() >= limit || examined >= limit * EXAMINED_PER_LIMIT {
                break;
            }
        }
        out.sort_by(|a, b| a.room.cmp(&b.room));
        let next = next.map(|()| format!("{}.{inner}", if in_locks { "l" } else { "p" }));
        Ok(Some(RoomsPage { rooms: out, next }))
    }
}
