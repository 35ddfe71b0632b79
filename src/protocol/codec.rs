//! The two subprotocols: `lockstep.v1.json` (text frames) and `lockstep.v1.msgpack` (binary
//! frames carrying the same objects as MessagePack maps).

use serde::Deserialize;
use tungstenite::{Message, Utf8Bytes};

use crate::error::ErrorCode;

use super::client::{self, DecodeError, Format, Request};
use super::server::ServerMessage;

pub const JSON_PROTOCOL: &str = "lockstep.v1.json";
pub const MSGPACK_PROTOCOL: &str = "lockstep.v1.msgpack";

/// Deepest nesting of objects/maps and arrays a client frame may have, the frame itself
/// counting as one level, in both codecs. Presence states are stored as JSON in Redis and read
/// back with serde_json, whose recursion limit is 128: a MessagePack state nested deeper than
/// that (rmp-serde allows 1024) could be stored but never read again, so its member could not
/// leave. 32 leaves room for the member envelope and is plenty for real app state.
pub const MAX_DEPTH: usize = 32;

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

    /// Decodes a client frame's payload. Frames nested deeper than [`MAX_DEPTH`] are refused
    /// with `bad_request` before any value tree is built.
    pub fn decode(self, bytes: &[u8]) -> Result<Request, DecodeError> {
        let within = match self {
            Codec::Json => json_depth_within(bytes, MAX_DEPTH),
            Codec::MsgPack => msgpack_depth_within(bytes, MAX_DEPTH),
        };
        if !within {
            let id = match self {
                Codec::Json => client::peek_id::<Json>(bytes),
                // Not the serde decoder: it recurses into what it skips (see msgpack_peek).
                Codec::MsgPack => super::msgpack_peek::id(bytes),
            };
            return Err(DecodeError {
                id,
                code: ErrorCode::BadRequest,
                message: format!("nested deeper than {MAX_DEPTH} levels"),
            });
        }
        match self {
            Codec::Json => client::decode::<Json>(bytes),
            Codec::MsgPack => client::decode::<MsgPack>(bytes),
        }
    }

    /// The length of `value` in this codec (MessagePack with named fields, as sent).
    pub fn encoded_len<T: serde::Serialize + ?Sized>(self, value: &T) -> usize {
        match self {
            Codec::Json => json_len_within(value, usize::MAX).unwrap_or(usize::MAX),
            Codec::MsgPack => rmp_serde::to_vec_named(value).map_or(usize::MAX, |v| v.len()),
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

/// False when the JSON text nests objects/arrays deeper than `max`. One pass over the bytes,
/// no recursion; brackets inside strings (with escapes) do not count. Malformed input is left
/// to the decoder.
fn json_depth_within(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// False when the MessagePack value nests maps/arrays deeper than `max` (rmp-serde's own
/// depth counter, skipping every value). Other decode errors are left to the decoder.
fn msgpack_depth_within(bytes: &[u8], max: usize) -> bool {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // rmp-serde refuses when its counter reaches zero, i.e. it allows `depth - 1` levels.
    de.set_max_depth(max + 1);
    !matches!(
        serde::de::IgnoredAny::deserialize(&mut de),
        Err(rmp_serde::decode::Error::DepthLimitExceeded)
    )
}

/// The length of `value` encoded as JSON, counted without building the text; stops counting
/// (and returns `None`) once past `max`, so an oversize value costs at most `max` bytes of work.
pub fn json_len_within<T: serde::Serialize + ?Sized>(value: &T, max: usize) -> Option<usize> {
    struct Counter {
        n: usize,
        max: usize,
    }
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.n += buf.len();
            if self.n > self.max {
                return Err(std::io::Error::other("over the limit"));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Counter { n: 0, max };
    serde_json::to_writer(&mut c, value).ok().map(|()| c.n)
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

    fn nested(depth: usize) -> serde_json::Value {
        let mut v = serde_json::json!(1);
        for i in 0..depth {
            v = if i % 2 == 0 {
                serde_json::json!([v])
            } else {
                serde_json::json!({ "k": v })
            };
        }
        v
    }

    #[test]
    fn nesting_is_capped_in_both_codecs() {
        // The frame object is one level: a state nested MAX_DEPTH - 1 deep is the most allowed.
        for (depth, ok) in [(MAX_DEPTH - 1, true), (MAX_DEPTH, false), (200, false)] {
            let frame = serde_json::json!({"type": "join", "id": 9, "room": "scene:1", "state": nested(depth)});
            let text = frame.to_string();
            let packed = rmp_serde::to_vec_named(&frame).unwrap();
            for (codec, bytes) in [
                (Codec::Json, text.as_bytes()),
                (Codec::MsgPack, &packed[..]),
            ] {
                match codec.decode(bytes) {
                    Ok(_) => assert!(ok, "{codec:?} depth {depth} accepted"),
                    Err(e) => {
                        assert!(!ok, "{codec:?} depth {depth}: {e}");
                        assert_eq!(
                            (e.code, e.id),
                            (ErrorCode::BadRequest, Some(9)),
                            "{codec:?} depth {depth}"
                        );
                    }
                }
            }
        }
        // Brackets inside strings, escaped quotes included, are not nesting.
        let s = format!(
            r#"{{"type":"join","room":"scene:1","state":"\"{}"}}"#,
            "[".repeat(100)
        );
        assert!(Codec::Json.decode(s.as_bytes()).is_ok());
    }

    #[test]
    fn json_len_counts_escapes_and_stops_at_the_limit() {
        let v = serde_json::json!("\u{1}".repeat(10));
        assert_eq!(json_len_within(&v, 1000), Some(62));
        assert_eq!(json_len_within(&v, 61), None);
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
