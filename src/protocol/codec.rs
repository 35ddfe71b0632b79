//! The two subprotocols: `lockstep.v1.json` (text frames) and `lockstep.v1.msgpack` (binary
//! frames carrying the same objects as MessagePack maps).

use axum::extract::ws::{Message, Utf8Bytes};
use serde::Deserialize;

use super::client::{self, DecodeError, Format, Request};
use super::server::ServerMessage;

pub const JSON_PROTOCOL: &str = "lockstep.v1.json";
pub const MSGPACK_PROTOCOL: &str = "lockstep.v1.msgpack";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
    MsgPack,
}

impl Codec {
    pub fn from_subprotocol(p: Option<&str>) -> Codec {
        match p {
            Some(MSGPACK_PROTOCOL) => Codec::MsgPack,
            _ => Codec::Json,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Codec::Json => JSON_PROTOCOL,
            Codec::MsgPack => MSGPACK_PROTOCOL,
        }
    }

    /// Decodes a client frame's payload.
    pub fn decode(self, bytes: &[u8]) -> Result<Request, DecodeError> {
        match self {
            Codec::Json => client::decode::<Json>(bytes),
            Codec::MsgPack => client::decode::<MsgPack>(bytes),
        }
    }

    /// Encodes a server message into the frame this codec sends. Serialization of these
    /// types cannot fail (string keys, no non-finite floats reach here).
    pub fn encode(self, msg: &ServerMessage<'_>) -> Message {
        match self {
            Codec::Json => match serde_json::to_string(msg) {
                Ok(s) => Message::Text(Utf8Bytes::from(s)),
                Err(e) => {
                    tracing::error!(error = %e, "json encoding failed");
                    Message::Text(Utf8Bytes::from_static(
                        r#"{"type":"error","code":"internal","message":"encoding failed"}"#,
                    ))
                }
            },
            Codec::MsgPack => match rmp_serde::to_vec_named(msg) {
                Ok(v) => Message::Binary(v.into()),
                Err(e) => {
                    tracing::error!(error = %e, "msgpack encoding failed");
                    Message::Binary(bytes::Bytes::new())
                }
            },
        }
    }
}

struct Json;
struct MsgPack;

impl Format for Json {
    fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }

    fn is_object(bytes: &[u8]) -> bool {
        bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
    }
}

/// Nesting rmp-serde follows before refusing a frame, as serde_json's (128). Its own default
/// (1024) overflows a 2 MiB task stack: a 1 KB frame of nested arrays aborted the process.
const MSGPACK_MAX_DEPTH: usize = 128;

impl Format for MsgPack {
    fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
        let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
        de.set_max_depth(MSGPACK_MAX_DEPTH);
        T::deserialize(&mut de).map_err(|e| e.to_string())
    }

    fn is_object(bytes: &[u8]) -> bool {
        // fixmap 0x80-0x8f, map16 0xde, map32 0xdf.
        matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::protocol::client::ClientMessage;

    #[test]
    fn decodes_every_type_in_both_codecs() {
        let frames = [
            r#"{"type":"join","room":"scene:1","state":{"a":1}}"#,
            r#"{"type":"leave","room":"scene:1"}"#,
            r#"{"type":"presence","room":"scene:1","focus":"segment:1-2"}"#,
            r#"{"type":"cursor","room":"scene:1","x":1.5,"y":2,"selection":[1,2]}"#,
            r#"{"type":"broadcast","room":"scene:1","event":"typing","data":null}"#,
            r#"{"type":"lock.acquire","id":7,"room":"scene:1","resource":"segment:1-2","action":"approve","wait":true}"#,
            r#"{"type":"lock.release","resource":"segment:1-2","token":3}"#,
            r#"{"type":"lock.extend","resource":"segment:1-2","token":3,"ttl_ms":1000}"#,
            r#"{"type":"lock.cancel_wait","resource":"segment:1-2"}"#,
            r#"{"type":"settings","share_cursor":false}"#,
            r#"{"type":"ping","id":1}"#,
        ];
        for f in frames {
            let json = Codec::Json
                .decode(f.as_bytes())
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            let value: serde_json::Value = serde_json::from_str(f).unwrap();
            let packed = rmp_serde::to_vec_named(&value).unwrap();
            let mp = Codec::MsgPack
                .decode(&packed)
                .unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(json, mp, "{f}");
        }
    }

    #[test]
    fn presence_distinguishes_absent_from_null() {
        let r = Codec::Json
            .decode(br#"{"type":"presence","room":"scene:1","focus":null}"#)
            .unwrap();
        let ClientMessage::Presence(p) = r.message else {
            panic!()
        };
        assert_eq!(p.focus, Some(None));
        assert_eq!(p.state, None);
    }

    #[test]
    fn errors_carry_codes_and_ids() {
        let cases: [(&[u8], ErrorCode, Option<u32>); 8] = [
            (b"{not json", ErrorCode::Malformed, None),
            (b"[1,2]", ErrorCode::Malformed, None),
            (
                br#"{"type":"nope","id":4}"#,
                ErrorCode::UnknownType,
                Some(4),
            ),
            (br#"{"id":4}"#, ErrorCode::BadRequest, Some(4)),
            (br#"{"type":"join","id":5}"#, ErrorCode::BadRequest, Some(5)),
            (
                br#"{"type":"join","id":5,"room":"Bad Name"}"#,
                ErrorCode::BadRequest,
                Some(5),
            ),
            (
                br#"{"type":"lock.release","id":6,"resource":"a:b","token":"x"}"#,
                ErrorCode::BadRequest,
                Some(6),
            ),
            (
                br#"{"type":"join","id":"x","room":"a:b"}"#,
                ErrorCode::BadRequest,
                None,
            ),
        ];
        for (frame, code, id) in cases {
            let e = Codec::Json.decode(frame).unwrap_err();
            assert_eq!(
                (e.code, e.id),
                (code, id),
                "{}",
                String::from_utf8_lossy(frame)
            );
        }
        assert_eq!(
            Codec::MsgPack.decode(&[0xc1]).unwrap_err().code,
            ErrorCode::Malformed
        );
        assert_eq!(
            Codec::MsgPack.decode(&[0x93, 1, 2, 3]).unwrap_err().code,
            ErrorCode::Malformed
        );
    }

    #[test]
    fn validates_actions_and_numbers() {
        let e = Codec::Json
            .decode(br#"{"type":"lock.acquire","room":"a:b","resource":"a:c","action":"Approve!"}"#)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn encodes_maps_with_type_in_msgpack() {
        let msg = ServerMessage::Pong { id: Some(3) };
        let Message::Binary(b) = Codec::MsgPack.encode(&msg) else {
            panic!()
        };
        let v: serde_json::Value = rmp_serde::from_slice(&b).unwrap();
        assert_eq!(v, serde_json::json!({"type":"pong","id":3}));
        let Message::Text(t) = Codec::Json.encode(&msg) else {
            panic!()
        };
        assert_eq!(t.as_str(), r#"{"type":"pong","id":3}"#);
    }
}
