//! The Hocuspocus v4 framing (lib0 encoding): every message is `varString(address)`,
//! `varUint(type)`, then the type's payload. The address is the document name, or
//! `name\0sessionId` from a provider with `sessionAwareness`. Connection-level Ping and Pong
//! are one byte with no address (`[9]`, `[10]`).
//!
//! Types 0 (Sync), 1 (Awareness) and 3 (QueryAwareness) carry exactly the y-websocket message
//! after the address, so the registry's y-websocket frames become Hocuspocus frames by putting
//! the address in front ([`prefixed`]).

use bytes::{BufMut, Bytes, BytesMut};
use yrs::encoding::write::Write;

/// The message types of `@hocuspocus/server` 4.x (`MessageType`).
pub mod kind {
    pub const SYNC: u32 = 0;
    pub const AWARENESS: u32 = 1;
    pub const AUTH: u32 = 2;
    pub const QUERY_AWARENESS: u32 = 3;
    /// Sync that does not ask for the server's SyncStep1 (server to server; treated as Sync).
    pub const SYNC_REPLY: u32 = 4;
    pub const STATELESS: u32 = 5;
    pub const BROADCAST_STATELESS: u32 = 6;
    pub const CLOSE: u32 = 7;
    pub const SYNC_STATUS: u32 = 8;
    pub const PING: u32 = 9;
    pub const PONG: u32 = 10;
}

/// y-protocols sync sub-types.
pub mod sync {
    pub const STEP1: u32 = 0;
    pub const STEP2: u32 = 1;
    pub const UPDATE: u32 = 2;
}

/// Auth sub-types (`@hocuspocus/common` `AuthMessageType`).
mod auth {
    pub const TOKEN: u32 = 0;
    pub const PERMISSION_DENIED: u32 = 1;
    pub const AUTHENTICATED: u32 = 2;
}

/// A client message that does not decode. The socket is closed with 1007.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Hocuspocus message: {0}")]
pub struct Malformed(pub &'static str);

/// One client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Ping,
    Pong,
    Doc(DocMessage<'a>),
}

/// A message addressed to one document.
#[derive(Debug, PartialEq, Eq)]
pub struct DocMessage<'a> {
    /// `name` or `name\0sessionId`: the key of the document on this socket.
    pub address: &'a str,
    pub kind: u32,
    /// The message from its type on: a y-websocket message for Sync, Awareness and
    /// QueryAwareness.
    pub message: &'a [u8],
    /// What follows the type.
    pub body: &'a [u8],
}

impl DocMessage<'_> {
    /// The document name: the address without a session id.
    pub fn document(&self) -> &str {
        self.address
            .split_once('\0')
            .map_or(self.address, |(name, _)| name)
    }
}

/// Reads a lib0 varUint (at most 32 bits) at `*at`.
fn read_var(data: &[u8], at: &mut usize) -> Result<u32, Malformed> {
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let Some(&b) = data.get(*at) else {
            return Err(Malformed("truncated number"));
        };
        *at += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(value).map_err(|_| Malformed("number out of range"));
        }
    }
    Err(Malformed("number too long"))
}

/// Reads a lib0 varUint8Array at `*at`.
fn read_buf<'a>(data: &'a [u8], at: &mut usize) -> Result<&'a [u8], Malformed> {
    let len = read_var(data, at)? as usize;
    let end = at
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or(Malformed("truncated buffer"))?;
    let buf = &data[*at..end];
    *at = end;
    Ok(buf)
}

fn read_str<'a>(data: &'a [u8], at: &mut usize) -> Result<&'a str, Malformed> {
    std::str::from_utf8(read_buf(data, at)?).map_err(|_| Malformed("string is not UTF-8"))
}

/// Splits a client frame into address, type and payload.
pub fn parse(data: &[u8]) -> Result<Frame<'_>, Malformed> {
    // One byte, no address: the provider tells its Ping and Pong from a document message
    // the same way.
    match data {
        [b] if u32::from(*b) == kind::PING => return Ok(Frame::Ping),
        [b] if u32::from(*b) == kind::PONG => return Ok(Frame::Pong),
        _ => {}
    }
    let mut at = 0;
    let address = read_str(data, &mut at)?;
    let start = at;
    let kind = read_var(data, &mut at)?;
    Ok(Frame::Doc(DocMessage {
        address,
        kind,
        message: &data[start..],
        body: &data[at..],
    }))
}

/// A Sync message's sub-type and, for SyncStep2 and Update, the update.
pub fn sync_parts(body: &[u8]) -> Result<(u32, &[u8]), Malformed> {
    let mut at = 0;
    let step = read_var(body, &mut at)?;
    match step {
        sync::STEP1 => Ok((step, &body[at..])),
        sync::STEP2 | sync::UPDATE => Ok((step, read_buf(body, &mut at)?)),
        _ => Err(Malformed("unknown sync message")),
    }
}

/// The token of an Auth message (`[0 = Token][varString token][varString version]?`);
/// `None` for the other auth sub-types (which a client has no reason to send).
pub fn auth_token(body: &[u8]) -> Result<Option<&str>, Malformed> {
    let mut at = 0;
    if read_var(body, &mut at)? != auth::TOKEN {
        return Ok(None);
    }
    read_str(body, &mut at).map(Some)
}

/// `varString(address)`: what every frame to that document starts with.
pub fn address_prefix(address: &str) -> Bytes {
    let mut v = Vec::with_capacity(address.len() + 2);
    v.write_string(address);
    Bytes::from(v)
}

/// `prefix` followed by `frame`, in one allocation.
pub fn prefixed(prefix: &[u8], frame: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(prefix.len() + frame.len());
    b.put_slice(prefix);
    b.put_slice(frame);
    b.freeze()
}

fn message(prefix: &[u8], kind: u32, rest: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut v = Vec::with_capacity(prefix.len() + 16);
    v.extend_from_slice(prefix);
    v.write_var(kind);
    rest(&mut v);
    Bytes::from(v)
}

/// The auth answer: `read-write`, or `readonly` (the provider's `authorizedScope`).
pub fn authenticated(prefix: &[u8], writable: bool) -> Bytes {
    message(prefix, kind::AUTH, |v| {
        v.write_var(auth::AUTHENTICATED);
        v.write_string(if writable { "read-write" } else { "readonly" });
    })
}

/// The auth refusal; the provider emits `authenticationFailed { reason }`.
pub fn permission_denied(prefix: &[u8], reason: &str) -> Bytes {
    message(prefix, kind::AUTH, |v| {
        v.write_var(auth::PERMISSION_DENIED);
        v.write_string(reason);
    })
}

/// Whether an update was saved: the provider counts `unsyncedChanges` down on `true`.
pub fn sync_status(prefix: &[u8], saved: bool) -> Bytes {
    message(prefix, kind::SYNC_STATUS, |v| v.write_var(u32::from(saved)))
}

/// The server ends this document on the socket (the provider emits `close` for it).
pub fn close(prefix: &[u8], reason: &str) -> Bytes {
    message(prefix, kind::CLOSE, |v| v.write_string(reason))
}

/// The server's SyncStep1 (its state vector, v1-encoded).
pub fn sync_step1(prefix: &[u8], state_vector: &[u8]) -> Bytes {
    message(prefix, kind::SYNC, |v| {
        v.write_var(sync::STEP1);
        v.write_buf(state_vector);
    })
}

pub const PING: &[u8] = &[kind::PING as u8];
pub const PONG: &[u8] = &[kind::PONG as u8];

#[cfg(test)]
mod tests {
    use super::*;

    fn doc_message(data: &[u8]) -> DocMessage<'_> {
        match parse(data).unwrap() {
            Frame::Doc(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_auth_message_of_the_provider_parses() {
        // AuthenticationMessage: varString name, Auth, Token, varString token, varString version.
        let mut v = Vec::new();
        v.write_string("scene:1");
        v.write_var(kind::AUTH);
        v.write_var(0u32);
        v.write_string("tok");
        v.write_string("4.8.0");
        let m = doc_message(&v);
        assert_eq!((m.address, m.kind), ("scene:1", kind::AUTH));
        assert_eq!(auth_token(m.body), Ok(Some("tok")));
    }

    #[test]
    fn the_message_after_the_address_is_a_y_websocket_message() {
        let mut v = Vec::new();
        v.write_string("scene:1\0abc");
        v.extend_from_slice(&[0, 2, 3, 9, 9, 9]);
        let m = doc_message(&v);
        assert_eq!(m.document(), "scene:1");
        assert_eq!(m.message, &[0, 2, 3, 9, 9, 9]);
        assert_eq!(sync_parts(m.body), Ok((sync::UPDATE, &[9u8, 9, 9][..])));
    }

    #[test]
    fn ping_and_pong_are_one_byte() {
        assert_eq!(parse(PING), Ok(Frame::Ping));
        assert_eq!(parse(PONG), Ok(Frame::Pong));
    }

    #[test]
    fn truncated_and_overlong_input_is_malformed() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[5, b'a']).is_err(), "address longer than the frame");
        assert!(parse(&[1, 0xff]).is_err(), "address is not UTF-8");
        assert!(parse(&[1, b'a']).is_err(), "no type");
        assert!(parse(&[1, b'a', 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(
            sync_parts(&[2, 10, 1]).is_err(),
            "update longer than the frame"
        );
        assert!(sync_parts(&[7]).is_err(), "unknown sync step");
        assert!(auth_token(&[0, 3, b'a']).is_err());
    }

    #[test]
    fn replies_carry_the_address() {
        let p = address_prefix("scene:1");
        assert_eq!(&p[..], b"\x07scene:1");
        assert_eq!(&sync_status(&p, true)[..], b"\x07scene:1\x08\x01");
        assert_eq!(
            &authenticated(&p, false)[..],
            b"\x07scene:1\x02\x02\x08readonly"
        );
        assert_eq!(
            &permission_denied(&p, "no")[..],
            b"\x07scene:1\x02\x01\x02no"
        );
        assert_eq!(&close(&p, "x")[..], b"\x07scene:1\x07\x01x");
        assert_eq!(&prefixed(&p, &[8, 1])[..], &sync_status(&p, true)[..]);
    }
}
