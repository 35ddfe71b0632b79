//! Property-based fuzzing of everything that decodes hostile input: client frames in both
//! codecs (`protocol::codec`), JWTs (`auth::Authenticator::verify`) and entity names
//! (`names`). Inputs are plain random bytes and valid inputs mutated (wrong types, huge and
//! odd numbers, deep nesting, invalid UTF-8, truncation, flipped bytes). No input may panic,
//! and every refusal must carry a documented code.
//!
//! Cases per property: `LOCKSTEP_FUZZ_CASES` (default 256, a few seconds in CI). A longer local
//! run: `LOCKSTEP_FUZZ_CASES=20000 cargo test --release --test fuzz_decoders`.

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use lockstep::auth::{AuthError, Authenticator, RoomPattern};
use lockstep::config::Config;
use lockstep::error::ErrorCode;
use lockstep::names::{Entity, valid_action};
use lockstep::protocol::client::{ClientMessage, Request};
use lockstep::protocol::codec::Codec;
use proptest::prelude::*;
use proptest::test_runner::Config as RunnerConfig;
use serde_json::{Value, json};

fn runner_config() -> RunnerConfig {
    let cases = std::env::var("LOCKSTEP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    RunnerConfig {
        cases,
        failure_persistence: None,
        ..RunnerConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Client frames
// ---------------------------------------------------------------------------------------------

/// What `Codec::decode` may answer a bad frame with (docs/protocol.md, "Errors"). A frame nested
/// too deeply is `bad_request` (or `malformed` when the parser's own limit refuses it first).
const FRAME_CODES: [ErrorCode; 3] = [
    ErrorCode::Malformed,
    ErrorCode::UnknownType,
    ErrorCode::BadRequest,
];

/// Decodes `bytes` in `codec` and checks the answer: a refusal has a documented code and a
/// bounded message, an acceptance holds only valid names and numbers.
fn check_frame(codec: Codec, bytes: &[u8]) -> Result<(), TestCaseError> {
    match codec.decode(bytes) {
        Err(e) => {
            prop_assert!(
                FRAME_CODES.contains(&e.code),
                "undocumented code {:?} for {:?}",
                e.code,
                String::from_utf8_lossy(bytes)
            );
            prop_assert!(!e.message.is_empty());
        }
        Ok(req) => check_request(&req)?,
    }
    Ok(())
}

fn check_entity(e: &Entity) -> Result<(), TestCaseError> {
    prop_assert!(spec_entity(e.as_str()), "accepted a bad name {e:?}");
    Ok(())
}

fn check_request(req: &Request) -> Result<(), TestCaseError> {
    if let Some(room) = req.message.room() {
        check_entity(room)?;
    }
    if let Some(resource) = req.message.resource() {
        check_entity(resource)?;
    }
    match &req.message {
        ClientMessage::Cursor(c) => prop_assert!(c.x.is_finite() && c.y.is_finite()),
        ClientMessage::LockAcquire(a) => {
            prop_assert!(valid_action(&a.action));
            prop_assert_ne!(a.ttl_ms, Some(0));
        }
        ClientMessage::LockExtend(e) => prop_assert!(e.ttl_ms > 0),
        ClientMessage::Presence(p) => {
            if let Some(Some(f)) = &p.focus {
                check_entity(f)?;
            }
        }
        ClientMessage::Broadcast(b) => prop_assert!(!b.event.is_empty() && b.event.len() <= 64),
        _ => {}
    }
    Ok(())
}

fn entity_strategy() -> impl Strategy<Value = String> {
    ("[a-z][a-z0-9_]{0,31}", "[A-Za-z0-9._~-]{1,128}").prop_map(|(t, i)| format!("{t}:{i}"))
}

/// A valid frame of every client message type, as a JSON object.
fn valid_frame() -> impl Strategy<Value = Value> {
    let e = entity_strategy;
    let id = proptest::option::of(any::<u32>());
    let n = || any::<u64>().prop_map(|n| n.max(1));
    prop_oneof![
        (e(), id.clone()).prop_map(|(room, id)| json!({"type": "join", "id": id, "room": room, "state": {"k": [1, "two", null]}})),
        (e(), id.clone()).prop_map(|(room, id)| json!({"type": "leave", "id": id, "room": room})),
        (e(), e(), id.clone()).prop_map(|(room, f, id)| json!({"type": "presence", "id": id, "room": room, "focus": f, "state": {"typing": true}})),
        (e(), -1e9f64..1e9, -1e9f64..1e9).prop_map(|(room, x, y)| json!({"type": "cursor", "room": room, "x": x, "y": y, "selection": [1, 2]})),
        (e(), "[a-z.]{1,64}").prop_map(|(room, ev)| json!({"type": "broadcast", "room": room, "event": ev, "data": {"a": 1}})),
        (e(), e(), "[a-z][a-z0-9_.-]{0,31}", n(), any::<bool>(), id.clone()).prop_map(|(room, res, action, ttl, wait, id)| json!({
            "type": "lock.acquire", "id": id, "room": room, "resource": res, "action": action,
            "ttl_ms": ttl, "wait": wait, "wait_timeout_ms": 1000,
        })),
        (e(), any::<u64>(), any::<bool>()).prop_map(|(res, token, force)| json!({"type": "lock.release", "resource": res, "token": token, "force": force})),
        (e(), any::<u64>(), n()).prop_map(|(res, token, ttl)| json!({"type": "lock.extend", "resource": res, "token": token, "ttl_ms": ttl})),
        e().prop_map(|res| json!({"type": "lock.cancel_wait", "resource": res})),
        any::<bool>().prop_map(|b| json!({"type": "settings", "share_cursor": b})),
        id.prop_map(|id| json!({"type": "ping", "id": id})),
    ]
}

/// Raw JSON text for a value that is wrong somewhere: wrong types, numbers out of every range,
/// odd strings, deep nesting.
fn weird_json() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        Just("\"\"".to_owned()),
        Just("-1".to_owned()),
        Just("-0".to_owned()),
        Just("0".to_owned()),
        Just("1.5".to_owned()),
        Just("4294967296".to_owned()),
        Just("18446744073709551615".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("1e308".to_owned()),
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("123456789012345678901234567890123456789".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"scene:42\\u0000\"".to_owned()),
        Just("\"sc\u{e9}ne:42\"".to_owned()),
        Just("\"scene:\u{1F600}\"".to_owned()),
        "[ -~]{0,200}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        (1usize..5000).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        (1usize..3000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (1usize..3000).prop_map(|d| format!("{}1{}", "{\"a\":".repeat(d), "}".repeat(d))),
        any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_else(|_| "0".into())),
        any::<i64>().prop_map(|n| n.to_string()),
    ]
}

/// A valid frame as JSON text with one field replaced, removed or added.
fn mutated_json_text() -> impl Strategy<Value = String> {
    (
        valid_frame(),
        any::<prop::sample::Index>(),
        weird_json(),
        0u8..4,
    )
        .prop_map(|(frame, which, weird, how)| {
            let mut fields: Vec<(String, String)> = frame
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect();
            let i = which.index(fields.len());
            match how {
                0 => fields[i].1 = weird,
                1 => {
                    fields.remove(i);
                }
                2 => fields.push(("unexpected".into(), weird)),
                // A duplicate key.
                _ => fields.push((fields[i].0.clone(), weird)),
            }
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::to_string(k).unwrap()))
                .collect();
            format!("{{{}}}", body.join(","))
        })
}

/// Byte-level damage: truncation, a flipped byte, an inserted invalid UTF-8 sequence.
fn damage(mut bytes: Vec<u8>, at: prop::sample::Index, how: u8, byte: u8) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    let i = at.index(bytes.len());
    match how {
        0 => bytes.truncate(i),
        1 => bytes[i] ^= byte.max(1),
        2 => {
            let bad: &[u8] = match byte % 4 {
                0 => &[0xff],
                1 => &[0xc0, 0x80],
                2 => &[0xed, 0xa0, 0x80],
                _ => &[0xf4, 0x90, 0x80, 0x80],
            };
            bytes.splice(i..i, bad.iter().copied());
        }
        _ => bytes[i] = byte,
    }
    bytes
}

/// MessagePack for a map written by hand, so values serde would never produce can be placed:
/// invalid UTF-8 strings, `bin` and `ext` where strings belong, deep nesting, odd integers.
fn weird_msgpack() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0xc0]),
        Just(vec![0xc3]),
        Just(vec![0xa2, 0xff, 0xfe]),
        Just(vec![0xc4, 0x03, b'a', b':', b'b']),
        Just(vec![0xd4, 0x01, 0x00]),
        Just(vec![0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0]),
        Just(vec![0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]),
        Just(vec![0xca, 0x7f, 0x80, 0, 0]),
        Just(vec![0xdb, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0xdd, 0xff, 0xff, 0xff, 0xff]),
        Just(vec![0xdf, 0xff, 0xff, 0xff, 0xff]),
        (1usize..5000).prop_map(|d| {
            let mut v = vec![0x91; d];
            v.push(0xc0);
            v
        }),
        (1usize..5000).prop_map(|d| {
            let mut v = Vec::new();
            for _ in 0..d {
                v.extend_from_slice(&[0x81, 0xa1, b'a']);
            }
            v.push(0x01);
            v
        }),
        any::<Vec<u8>>(),
    ]
}

/// A valid frame as MessagePack with one field's value replaced by a hand-made one.
fn mutated_msgpack() -> impl Strategy<Value = Vec<u8>> {
    (valid_frame(), any::<prop::sample::Index>(), weird_msgpack()).prop_map(
        |(frame, which, weird)| {
            let map = frame.as_object().unwrap();
            let i = which.index(map.len());
            // fixmap and fixstr headers: frames have < 16 fields, keys < 32 bytes.
            let mut out = vec![0x80 | map.len() as u8];
            for (j, (k, v)) in map.iter().enumerate() {
                out.push(0xa0 | k.len() as u8);
                out.extend_from_slice(k.as_bytes());
                if j == i {
                    out.extend_from_slice(&weird);
                } else {
                    out.extend(rmp_serde::to_vec_named(v).unwrap());
                }
            }
            out
        },
    )
}

proptest! {
    #![proptest_config(runner_config())]

    #[test]
    fn random_bytes_are_refused_with_a_code(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        check_frame(Codec::Json, &bytes)?;
        check_frame(Codec::MsgPack, &bytes)?;
    }

    #[test]
    fn valid_frames_decode_the_same_in_both_codecs(frame in valid_frame()) {
        let text = serde_json::to_vec(&frame).unwrap();
        let packed = rmp_serde::to_vec_named(&frame).unwrap();
        let json = Codec::Json.decode(&text);
        let mp = Codec::MsgPack.decode(&packed);
        prop_assert!(json.is_ok(), "{frame}: {json:?}");
        let (json, mp) = (json.unwrap(), mp.unwrap());
        match (&json.message, &mp.message) {
            // serde_json parses floats to within an ulp (no `float_roundtrip`), MessagePack
            // carries the bits: a cursor may differ in its last bit.
            (ClientMessage::Cursor(a), ClientMessage::Cursor(b)) => {
                prop_assert_eq!(&a.room, &b.room);
                prop_assert!((a.x - b.x).abs() <= a.x.abs() * 1e-15 && (a.y - b.y).abs() <= a.y.abs() * 1e-15);
            }
            _ => prop_assert_eq!(&json, &mp),
        }
        check_request(&json)?;
    }

    #[test]
    fn mutated_json_frames_never_panic(
        text in mutated_json_text(),
        at in any::<prop::sample::Index>(),
        how in 0u8..5,
        byte in any::<u8>(),
    ) {
        check_frame(Codec::Json, text.as_bytes())?;
        // A value that is valid JSON gets the same answer as MessagePack (same objects).
        if let Ok(v) = serde_json::from_str::<Value>(&text) {
            check_frame(Codec::MsgPack, &rmp_serde::to_vec_named(&v).unwrap())?;
        }
        if how < 4 {
            let damaged = damage(text.into_bytes(), at, how, byte);
            check_frame(Codec::Json, &damaged)?;
            check_frame(Codec::MsgPack, &damaged)?;
        }
    }

    #[test]
    fn mutated_msgpack_frames_never_panic(
        bytes in mutated_msgpack(),
        at in any::<prop::sample::Index>(),
        how in 0u8..5,
        byte in any::<u8>(),
    ) {
        check_frame(Codec::MsgPack, &bytes)?;
        if how < 4 {
            check_frame(Codec::MsgPack, &damage(bytes, at, how, byte))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// JWTs
// ---------------------------------------------------------------------------------------------

const SECRET: &str = "fuzz-secret-0123456789abcdef-0123456789";

fn hs_auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::for_tests(dir.path().to_owned());
        c.jwt_secret = Some(SECRET.into());
        Authenticator::from_config(&c).unwrap()
    })
}

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Verifies `token`: never a panic, a refusal is `unauthorized`, an acceptance is a sane user.
fn check_token(token: &str) -> Result<(), TestCaseError> {
    match hs_auth().verify(token) {
        Err(e) => {
            prop_assert_eq!(e.code(), ErrorCode::Unauthorized, "{:?}", e);
            prop_assert!(
                matches!(
                    e,
                    AuthError::Missing | AuthError::Expired | AuthError::Invalid(_)
                ),
                "{e:?}"
            );
            let text = e.to_string();
            prop_assert!(!text.contains(SECRET));
            prop_assert!(
                text.len() < 4096,
                "a long error message: {} bytes",
                text.len()
            );
        }
        Ok(p) => {
            let sub = p.user_id.chars().count();
            prop_assert!((1..=128).contains(&sub), "user id {:?}", p.user_id);
            prop_assert!(!p.user_id.chars().any(char::is_control));
        }
    }
    Ok(())
}

/// A claim value that is wrong somewhere.
fn weird_claim() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!(-1)),
        Just(json!(1.5)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e300)),
        Just(json!("")),
        Just(json!("\u{0}")),
        Just(json!({"*": "owner", "Bad Room": "editor"})),
        Just(json!({"scene:*": "god"})),
        Just(json!({"scene:*": 3})),
        any::<String>().prop_map(Value::String),
        (1usize..3000).prop_map(|n| Value::String("x".repeat(n))),
        (1usize..1500).prop_map(|n| {
            Value::Object(
                (0..n)
                    .map(|i| (format!("scene:{i}"), json!("editor")))
                    .collect(),
            )
        }),
        (1usize..120).prop_map(|d| {
            let mut v = json!(1);
            for _ in 0..d {
                v = json!([v]);
            }
            v
        }),
    ]
}

fn valid_claims() -> impl Strategy<Value = Value> {
    (
        "[A-Za-z0-9_@.-]{1,40}",
        proptest::option::of("[ -~]{0,60}"),
        prop::collection::btree_map(
            prop_oneof![entity_strategy(), Just("*".to_owned()), "[a-z]{1,8}:\\*"],
            prop_oneof![
                Just("viewer"),
                Just("commenter"),
                Just("editor"),
                Just("owner")
            ],
            0..5,
        ),
    )
        .prop_map(|(sub, name, rooms)| {
            json!({"sub": sub, "name": name, "exp": now() + 3600, "rooms": rooms})
        })
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

/// `header.payload` signed with the test secret (HS256), whatever the header says.
fn signed(header: &Value, payload: &Value) -> String {
    let message = format!("{}.{}", b64(header), b64(payload));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{sig}")
}

fn weird_header() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"alg": "HS256", "typ": "JWT"})),
        Just(json!({"alg": "HS256"})),
        Just(json!({"alg": "none"})),
        Just(json!({"alg": "NONE", "typ": "JWT"})),
        Just(json!({"alg": "RS256"})),
        Just(json!({"alg": "ES256"})),
        Just(json!({"alg": "HS512"})),
        Just(json!({"alg": "EdDSA"})),
        Just(json!({"alg": 7})),
        Just(json!({})),
        Just(json!([])),
        Just(json!({"alg": "HS256", "crit": ["exp"]})),
        Just(json!({"alg": "HS256", "jku": "http://example.invalid/keys"})),
        any::<String>().prop_map(|s| json!({"alg": "HS256", "kid": s})),
        any::<String>().prop_map(|s| json!({"alg": s})),
    ]
}

proptest! {
    #![proptest_config(runner_config())]

    #[test]
    fn random_tokens_are_unauthorized(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        check_token(&String::from_utf8_lossy(&bytes))?;
    }

    #[test]
    fn random_three_part_tokens_are_unauthorized(
        parts in proptest::collection::vec("[A-Za-z0-9_=+/.-]{0,80}", 1..5),
    ) {
        check_token(&parts.join("."))?;
    }

    #[test]
    fn signed_tokens_with_mutated_claims_never_panic(
        header in weird_header(),
        claims in valid_claims(),
        field in prop_oneof![
            Just("sub"), Just("name"), Just("avatar"), Just("color"), Just("rooms"),
            Just("exp"), Just("nbf"), Just("iat"), Just("iss"), Just("aud"),
        ],
        value in weird_claim(),
        remove in any::<bool>(),
    ) {
        let mut claims = claims;
        if remove {
            claims.as_object_mut().unwrap().remove(field);
        } else {
            claims[field] = value;
        }
        check_token(&signed(&header, &claims))?;
        // The same with a signature made for other content, and truncated.
        let t = signed(&header, &claims);
        check_token(&t[..t.len() / 2])?;
        let (body, _) = t.rsplit_once('.').unwrap();
        check_token(&format!("{body}.{}", URL_SAFE_NO_PAD.encode([0u8; 32])))?;
    }

    #[test]
    fn signed_valid_claims_are_accepted(claims in valid_claims()) {
        let t = signed(&json!({"alg": "HS256", "typ": "JWT"}), &claims);
        let p = hs_auth().verify(&t);
        prop_assert!(p.is_ok(), "{claims}: {p:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Entity names
// ---------------------------------------------------------------------------------------------

/// The contract's grammar (DESIGN.md, "Names"), written independently of `names.rs`:
/// type `[a-z][a-z0-9_]{0,31}`, `:`, id `[A-Za-z0-9._~-]{1,128}`.
fn spec_entity(s: &str) -> bool {
    let Some((ty, id)) = s.split_once(':') else {
        return false;
    };
    let mut t = ty.chars();
    matches!(t.next(), Some('a'..='z'))
        && ty.chars().count() <= 32
        && t.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && (1..=128).contains(&id.chars().count())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-'))
}

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        entity_strategy(),
        any::<String>(),
        "[a-zA-Z0-9:_.~*-]{0,40}",
        "[a-z]{1,40}:[A-Za-z0-9._~-]{100,140}",
        "[a-z][a-z0-9_]{28,36}:x",
        (
            entity_strategy(),
            any::<char>(),
            any::<prop::sample::Index>()
        )
            .prop_map(|(s, c, i)| {
                let mut chars: Vec<char> = s.chars().collect();
                let at = i.index(chars.len() + 1);
                chars.insert(at, c);
                chars.into_iter().collect()
            }),
    ]
}

proptest! {
    #![proptest_config(runner_config())]

    #[test]
    fn entity_names_follow_the_grammar(s in name_like()) {
        let parsed = Entity::parse(&s);
        prop_assert_eq!(parsed.is_ok(), spec_entity(&s), "{:?} -> {:?}", s, parsed);
        match parsed {
            Ok(e) => prop_assert_eq!(e.as_str(), s.as_str()),
            Err(err) => prop_assert!(err.to_string().chars().count() < 200, "{}", err),
        }
        // Room patterns: `*`, `type:*` or an entity, nothing else.
        let pattern = RoomPattern::parse(&s);
        let spec = s == "*"
            || spec_entity(&s)
            || s.strip_suffix(":*").is_some_and(|t| spec_entity(&format!("{t}:x")));
        prop_assert_eq!(pattern.is_some(), spec, "{:?}", s);
        // Through the wire decoder too: a bad room is `bad_request`, never a crash.
        let frame = serde_json::to_vec(&json!({"type": "leave", "id": 1, "room": s})).unwrap();
        match Codec::Json.decode(&frame) {
            Ok(_) => prop_assert!(spec_entity(&s)),
            Err(e) => {
                prop_assert!(!spec_entity(&s));
                prop_assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(1)));
            }
        }
    }

    #[test]
    fn actions_follow_the_grammar(s in prop_oneof![any::<String>(), "[a-z0-9_.-]{0,40}"]) {
        let mut c = s.chars();
        let spec = matches!(c.next(), Some('a'..='z'))
            && s.len() <= 32
            && c.all(|ch| matches!(ch, 'a'..='z' | '0'..='9' | '_' | '.' | '-'));
        prop_assert_eq!(valid_action(&s), spec, "{:?}", s);
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions found by the fuzzers
// ---------------------------------------------------------------------------------------------

/// Runs `f` on a thread with a tokio worker's default stack (2 MiB), where frames are decoded.
fn on_task_sized_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap();
}

/// MessagePack nested 1000 deep (a 1 KB frame) overflowed the stack and aborted the process:
/// rmp-serde's own depth limit is 1024. Now refused past 32 levels like JSON, and the refusal
/// (which reads the request id) does not recurse either.
#[test]
fn deeply_nested_msgpack_is_refused_not_a_crash() {
    on_task_sized_stack(|| {
        let mut accepted = Vec::new();
        for depth in [
            30, 31, 32, 100, 127, 129, 200, 500, 1000, 1023, 1025, 4000, 100_000,
        ] {
            // Top level: a frame that is nested arrays.
            let mut top = vec![0x91; depth];
            top.push(0xc0);
            let e = Codec::MsgPack.decode(&top).unwrap_err();
            assert!(FRAME_CODES.contains(&e.code), "{depth}: {e:?}");
            // Inside a field the envelope skips and the body keeps (`state`).
            let mut join = vec![0x83, 0xa4];
            join.extend_from_slice(b"type");
            join.extend_from_slice(&[0xa4]);
            join.extend_from_slice(b"join");
            join.extend_from_slice(&[0xa4]);
            join.extend_from_slice(b"room");
            join.extend_from_slice(&[0xa7]);
            join.extend_from_slice(b"scene:1");
            join.extend_from_slice(&[0xa5]);
            join.extend_from_slice(b"state");
            join.extend(std::iter::repeat_n(0x91, depth));
            join.push(0xc0);
            match Codec::MsgPack.decode(&join) {
                Ok(_) => accepted.push(depth),
                Err(e) => assert!(FRAME_CODES.contains(&e.code), "{depth}: {e:?}"),
            }
            // The same in JSON.
            let text = format!(
                r#"{{"type":"join","room":"scene:1","state":{}{}}}"#,
                "[".repeat(depth),
                "]".repeat(depth)
            );
            if let Err(e) = Codec::Json.decode(text.as_bytes()) {
                assert!(FRAME_CODES.contains(&e.code), "{depth}: {e:?}");
            }
        }
        // The nesting limit (codec::MAX_DEPTH = 32 levels, the frame's map included).
        assert_eq!(accepted, [30, 31], "accepted depths");
    });
}
