//! `room.snapshot` in frames that can always be delivered.
//!
//! A snapshot is one frame while it fits the page budget (what clients always got). A larger
//! one is split into pages (`page`/`pages`), each under the budget in the receiving session's
//! own codec, so no snapshot frame can exceed what the socket may write, whatever the room
//! holds: members are capped in number and state size, not in total.

use serde::Serialize;
use tungstenite::Message;

use super::Codec;
use super::server::{LockView, ServerMessage};
use crate::engine::Member;
use crate::names::Entity;

/// Bytes a page spends outside its items (type, room, field names, page numbers).
const PAGE_OVERHEAD: usize = 256;

/// The frames of a snapshot of `room`, each at most `budget` bytes unless a single member or
/// lock is larger by itself (then it travels alone).
pub fn snapshot_frames(
    codec: Codec,
    room: &Entity,
    members: &[Member],
    locks: &[LockView<'_>],
    budget: usize,
) -> Vec<Message> {
    // The single-frame form, without page fields, as before paging existed.
    let whole = codec.encode(&ServerMessage::RoomSnapshot {
        room,
        members,
        locks: locks.iter().map(LockView::reborrow).collect(),
    });
    if frame_len(&whole) <= budget {
        return vec![whole];
    }
    let room_len = room.as_str().len();
    let room_budget = budget.saturating_sub(PAGE_OVERHEAD + room_len).max(1);
    let member_pages = split(members, codec, room_budget);
    // Locks start on a fresh page after the members (simple, at most one page more).
    let lock_pages = split(locks, codec, room_budget);
    let pages = (member_pages.len() + lock_pages.len()).max(1) as u32;
    let mut frames = Vec::with_capacity(pages as usize);
    let mut page = 0;
    for r in member_pages {
        page += 1;
        frames.push(codec.encode(&ServerMessage::RoomSnapshotPage {
            room,
            members: &members[r],
            locks: &[],
            page,
            pages,
        }));
    }
    for r in lock_pages {
        page += 1;
        frames.push(codec.encode(&ServerMessage::RoomSnapshotPage {
            room,
            members: &[],
            locks: &locks[r],
            page,
            pages,
        }));
    }
    frames
}

/// Splits `items` into consecutive ranges whose encodings (plus a separator each) fit `budget`.
fn split<T: Serialize>(items: &[T], codec: Codec, budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut used) = (0, 0usize);
    for (i, item) in items.iter().enumerate() {
        let len = codec.encoded_len(item).saturating_add(1);
        if used.saturating_add(len) > budget && i > start {
            ranges.push(start..i);
            start = i;
            used = 0;
        }
        used = used.saturating_add(len);
    }
    if start < items.len() {
        ranges.push(start..items.len());
    }
    ranges
}

/// The payload length of a data frame (0 for control frames).
pub fn frame_len(m: &Message) -> usize {
    match m {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn member(i: usize, state_len: usize) -> Member {
        Member {
            user_id: format!("u{i}").as_str().into(),
            session_id: format!("s{i}").as_str().into(),
            name: "N".into(),
            avatar: None,
            color: "#000".into(),
            role: Role::Editor,
            focus: None,
            state: Some(serde_json::Value::String("\u{1}".repeat(state_len))),
            since: i as u64,
        }
    }

    fn decode(codec: Codec, m: &Message) -> serde_json::Value {
        match (codec, m) {
            (Codec::Json, Message::Text(t)) => serde_json::from_str(t).unwrap(),
            (Codec::MsgPack, Message::Binary(b)) => rmp_serde::from_slice(b).unwrap(),
            _ => panic!("wrong frame kind"),
        }
    }

    #[test]
    fn small_rooms_keep_the_single_frame_form() {
        let room = Entity::parse("scene:1").unwrap();
        let members = [member(1, 10)];
        for codec in [Codec::Json, Codec::MsgPack] {
            let frames = snapshot_frames(codec, &room, &members, &[], 32 * 1024);
            assert_eq!(frames.len(), 1);
            let v = decode(codec, &frames[0]);
            assert_eq!(v["type"], "room.snapshot");
            assert_eq!(v["members"].as_array().unwrap().len(), 1);
            assert!(v.get("page").is_none() && v.get("pages").is_none(), "{v}");
        }
    }

    #[test]
    fn large_rooms_are_paged_under_the_budget_in_both_codecs() {
        let room = Entity::parse("scene:1").unwrap();
        // Escaping makes each state ~6x larger in JSON than in MessagePack.
        let members: Vec<Member> = (0..50).map(|i| member(i, 600)).collect();
        let budget = 16 * 1024;
        for codec in [Codec::Json, Codec::MsgPack] {
            let frames = snapshot_frames(codec, &room, &members, &[], budget);
            let mut seen = Vec::new();
            for (i, f) in frames.iter().enumerate() {
                assert!(
                    frame_len(f) <= budget,
                    "{codec:?} page {i}: {}",
                    frame_len(f)
                );
                let v = decode(codec, f);
                assert_eq!(v["type"], "room.snapshot");
                assert_eq!(v["page"], i + 1);
                assert_eq!(v["pages"], frames.len());
                for m in v["members"].as_array().unwrap() {
                    seen.push(m["session_id"].as_str().unwrap().to_owned());
                }
            }
            let want: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
            assert_eq!(seen, want, "{codec:?}: every member once, in order");
            if codec == Codec::Json {
                assert!(frames.len() > 1);
            }
        }
    }
}
