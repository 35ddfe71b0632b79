//! JWT verification, the admin token and dev-mode minting, with real keys from `tests/fixtures`
//! (see its README for how they were made).

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use lockstep::auth::{
    AuthError, Authenticator, DEV_TOKEN_TTL, LEEWAY_SECS, Role, color_for, parse_bearer,
};
use lockstep::config::Config;
use lockstep::error::ErrorCode;
use lockstep::names::Entity;
use serde_json::{Value, json};

const SECRET: &str = "a-test-secret-that-is-long-enough-0123456789";
const ADMIN: &str = "admin-token-0123456789abcdef";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture exists")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn entity(s: &str) -> Entity {
    Entity::parse(s).unwrap()
}

/// A test config (dev mode until a key is set), with `edit` applied.
fn authenticator(edit: impl FnOnce(&mut Config)) -> Result<Authenticator, AuthError> {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::for_tests(dir.path().to_owned());
    edit(&mut c);
    Authenticator::from_config(&c)
}

fn hs_auth() -> Authenticator {
    authenticator(|c| c.jwt_secret = Some(SECRET.into())).unwrap()
}

fn rs_auth() -> Authenticator {
    authenticator(|c| c.jwt_public_key = Some(fixture("rsa_public.pem"))).unwrap()
}

fn es_auth() -> Authenticator {
    authenticator(|c| c.jwt_public_key = Some(fixture("ec_public.pem"))).unwrap()
}

fn jwks_auth() -> Authenticator {
    authenticator(|c| c.jwt_jwks = Some(fixture("jwks.json"))).unwrap()
}

fn hs_key() -> EncodingKey {
    EncodingKey::from_secret(SECRET.as_bytes())
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&read_fixture("rsa_private.pem")).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&read_fixture("ec_private.pem")).unwrap()
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

/// Valid for an hour, with rooms.
fn claims() -> Value {
    json!({
        "sub": "u-1",
        "exp": now() + 3600,
        "rooms": {"*": "viewer", "scene:*": "editor", "scene:42": "owner"},
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

fn invalid(r: Result<lockstep::auth::Principal, AuthError>) -> String {
    match r {
        Err(AuthError::Invalid(m)) => m,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn hs256_token_gives_principal_with_roles() {
    let auth = hs_auth();
    assert!(!auth.is_dev());
    let token = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(
            claims(),
            json!({"name": "Ada", "avatar": "https://x.test/a.png", "color": "#ff0000"}),
        ),
    );
    let p = auth.verify(&token).unwrap();
    assert_eq!(&*p.user_id, "u-1");
    assert_eq!(&*p.name, "Ada");
    assert_eq!(p.avatar.as_deref(), Some("https://x.test/a.png"));
    assert_eq!(&*p.color, "#ff0000");
    assert!(!p.admin);
    assert_eq!(p.role_in(&entity("scene:42")), Some(Role::Owner));
    assert_eq!(p.role_in(&entity("scene:7")), Some(Role::Editor));
    assert_eq!(p.role_in(&entity("story:1")), Some(Role::Viewer));
}

#[test]
fn defaults_for_name_color_and_rooms() {
    let token = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &json!({"sub": "bob", "exp": now() + 60}),
    );
    let p = hs_auth().verify(&token).unwrap();
    assert_eq!(&*p.name, "bob");
    assert_eq!(&*p.color, color_for("bob"));
    assert!(p.avatar.is_none());
    assert!(p.grants().rooms.is_empty());
    assert_eq!(p.role_in(&entity("scene:1")), None);
}

#[test]
fn expiry_honours_the_leeway() {
    assert_eq!(LEEWAY_SECS, 5);
    let auth = hs_auth();
    let expired = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(claims(), json!({"exp": now() - 60})),
    );
    assert!(matches!(auth.verify(&expired), Err(AuthError::Expired)));
    let just_expired = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(claims(), json!({"exp": now() - 2})),
    );
    assert!(auth.verify(&just_expired).is_ok(), "within the 5 s leeway");
    let no_exp = sign(Algorithm::HS256, None, &hs_key(), &json!({"sub": "u-1"}));
    assert!(invalid(auth.verify(&no_exp)).contains("exp"));
}

#[test]
fn nbf_in_the_future_is_refused() {
    let auth = hs_auth();
    let early = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(claims(), json!({"nbf": now() + 120})),
    );
    assert!(invalid(auth.verify(&early)).contains("nbf"));
    let ok = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(claims(), json!({"nbf": now() - 10})),
    );
    assert!(auth.verify(&ok).is_ok());
}

#[test]
fn wrong_secret_is_invalid_and_the_message_is_safe() {
    let token = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(b"some-other-secret-some-other-secret"),
        &claims(),
    );
    let err = hs_auth().verify(&token).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
    assert!(text.contains("signature"), "{text}");
    assert!(!text.contains(SECRET) && !text.contains(&token));
    assert_eq!(err.code(), ErrorCode::Unauthorized);
}

#[test]
fn missing_and_garbage_tokens() {
    let auth = hs_auth();
    assert!(matches!(auth.verify(""), Err(AuthError::Missing)));
    assert!(matches!(auth.verify_bearer("  "), Err(AuthError::Missing)));
    assert_eq!(invalid(auth.verify("not-a-jwt")), "malformed token");
    assert!(matches!(auth.verify("a.b.c"), Err(AuthError::Invalid(_))));
    let huge = "x".repeat(lockstep::auth::MAX_TOKEN_BYTES + 1);
    assert!(invalid(auth.verify(&huge)).contains("longer"));
}

#[test]
fn rs256_via_pem() {
    let auth = rs_auth();
    assert!(auth.describe().starts_with("RS256"), "{}", auth.describe());
    let token = sign(Algorithm::RS256, None, &rsa_key(), &claims());
    let p = auth.verify(&token).unwrap();
    assert_eq!(&*p.user_id, "u-1");
    assert_eq!(p.role_in(&entity("scene:42")), Some(Role::Owner));
    // An ES256 token (other key type) is refused by algorithm, before any signature check.
    let es = sign(Algorithm::ES256, None, &ec_key(), &claims());
    assert!(invalid(auth.verify(&es)).contains("algorithm"));
}

#[test]
fn es256_via_pem() {
    let auth = es_auth();
    assert!(auth.describe().starts_with("ES256"), "{}", auth.describe());
    let token = sign(Algorithm::ES256, None, &ec_key(), &claims());
    assert_eq!(&*auth.verify(&token).unwrap().user_id, "u-1");
    let rs = sign(Algorithm::RS256, None, &rsa_key(), &claims());
    assert!(invalid(auth.verify(&rs)).contains("algorithm"));
}

#[test]
fn jwks_selects_the_key_by_kid() {
    let auth = jwks_auth();
    let rs = sign(Algorithm::RS256, Some("rsa-1"), &rsa_key(), &claims());
    let es = sign(Algorithm::ES256, Some("ec-1"), &ec_key(), &claims());
    assert_eq!(&*auth.verify(&rs).unwrap().user_id, "u-1");
    assert_eq!(&*auth.verify(&es).unwrap().user_id, "u-1");

    // Unknown kid; no kid with two keys; the kid of the other key type.
    let unknown = sign(Algorithm::RS256, Some("nope"), &rsa_key(), &claims());
    assert!(invalid(auth.verify(&unknown)).contains("kid"));
    let no_kid = sign(Algorithm::RS256, None, &rsa_key(), &claims());
    assert!(invalid(auth.verify(&no_kid)).contains("kid"));
    let mismatched = sign(Algorithm::ES256, Some("rsa-1"), &ec_key(), &claims());
    assert!(invalid(auth.verify(&mismatched)).contains("algorithm"));
    // Right kid and algorithm, but the payload was changed after signing.
    let mut parts: Vec<String> = rs.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&with(claims(), json!({"sub": "mallory"}))).unwrap());
    assert!(invalid(auth.verify(&parts.join("."))).contains("signature"));
}

#[test]
fn jwks_with_one_key_accepts_a_token_without_kid() {
    let dir = tempfile::tempdir().unwrap();
    let full: Value = serde_json::from_slice(&read_fixture("jwks.json")).unwrap();
    let ec_only = json!({"keys": [full["keys"][1].clone()]});
    let path = dir.path().join("one.json");
    std::fs::write(&path, serde_json::to_vec(&ec_only).unwrap()).unwrap();
    let auth = authenticator(|c| c.jwt_jwks = Some(path.clone())).unwrap();
    let token = sign(Algorithm::ES256, None, &ec_key(), &claims());
    assert!(auth.verify(&token).is_ok());
    let wrong_kid = sign(Algorithm::ES256, Some("rsa-1"), &ec_key(), &claims());
    assert!(invalid(auth.verify(&wrong_kid)).contains("kid"));
}

#[test]
fn jwks_skips_unsupported_keys_and_refuses_symmetric_ones() {
    let dir = tempfile::tempdir().unwrap();
    let full: Value = serde_json::from_slice(&read_fixture("jwks.json")).unwrap();
    let with_extras = json!({"keys": [
        full["keys"][0].clone(),
        {"kty": "oct", "kid": "hmac", "k": URL_SAFE_NO_PAD.encode(SECRET)},
        {"kty": "RSA", "kid": "enc", "use": "enc", "n": full["keys"][0]["n"], "e": "AQAB"},
    ]});
    let path = dir.path().join("mixed.json");
    std::fs::write(&path, serde_json::to_vec(&with_extras).unwrap()).unwrap();
    let auth = authenticator(|c| c.jwt_jwks = Some(path.clone())).unwrap();
    // The oct key is skipped: an HS256 token naming it is refused.
    let hs = sign(Algorithm::HS256, Some("hmac"), &hs_key(), &claims());
    assert!(matches!(auth.verify(&hs), Err(AuthError::Invalid(_))));
    // The only usable key is the RSA one, so even a token without kid may use it.
    let rs = sign(Algorithm::RS256, None, &rsa_key(), &claims());
    assert!(auth.verify(&rs).is_ok());
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let auth = authenticator(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.jwt_issuer = Some("https://idp.test".into());
        c.jwt_audience = Some("lockstep".into());
    })
    .unwrap();
    let good = with(
        claims(),
        json!({"iss": "https://idp.test", "aud": "lockstep"}),
    );
    assert!(
        auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &good))
            .is_ok()
    );
    let many_aud = with(good.clone(), json!({"aud": ["other", "lockstep"]}));
    assert!(
        auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &many_aud))
            .is_ok()
    );

    let wrong_aud = with(good.clone(), json!({"aud": "other"}));
    assert!(
        invalid(auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &wrong_aud)))
            .contains("audience")
    );
    let wrong_iss = with(good.clone(), json!({"iss": "https://evil.test"}));
    assert!(
        invalid(auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &wrong_iss)))
            .contains("issuer")
    );
    let no_iss = with(claims(), json!({"aud": "lockstep"}));
    assert!(
        invalid(auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &no_iss))).contains("iss")
    );
    let no_aud = with(claims(), json!({"iss": "https://idp.test"}));
    assert!(
        invalid(auth.verify(&sign(Algorithm::HS256, None, &hs_key(), &no_aud))).contains("aud")
    );

    // Not configured: iss and aud are ignored, whatever they say.
    let any = with(claims(), json!({"iss": "whoever", "aud": "something-else"}));
    assert!(
        hs_auth()
            .verify(&sign(Algorithm::HS256, None, &hs_key(), &any))
            .is_ok()
    );
}

#[test]
fn hs256_token_against_a_public_key_is_refused() {
    // The classic algorithm-confusion attack: HMAC with the public key's bytes as the secret.
    let pem = read_fixture("rsa_public.pem");
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&pem),
        &claims(),
    );
    assert!(invalid(rs_auth().verify(&forged)).contains("algorithm"));

    let ec_pem = read_fixture("ec_public.pem");
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&ec_pem),
        &claims(),
    );
    assert!(invalid(es_auth().verify(&forged)).contains("algorithm"));

    let forged = sign(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(&pem),
        &claims(),
    );
    assert!(invalid(jwks_auth().verify(&forged)).contains("algorithm"));
}

#[test]
fn alg_none_is_refused() {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        for auth in [
            hs_auth(),
            rs_auth(),
            jwks_auth(),
            authenticator(|_| {}).unwrap(),
        ] {
            let err = auth.verify(&token).unwrap_err();
            assert!(matches!(err, AuthError::Invalid(_)), "{err:?}");
        }
    }
    let message = invalid(hs_auth().verify(&format!("{header}.{payload}.")));
    assert!(message.contains("none"), "{message}");
}

#[test]
fn bad_rooms_and_subjects_are_refused_with_the_reason() {
    let auth = hs_auth();
    let check = |extra: Value, expect: &str| {
        let token = sign(Algorithm::HS256, None, &hs_key(), &with(claims(), extra));
        let message = invalid(auth.verify(&token));
        assert!(
            message.contains(expect),
            "{message:?} should mention {expect:?}"
        );
    };
    check(json!({"rooms": {"Scene:1": "editor"}}), "Scene:1");
    check(json!({"rooms": {"scene": "editor"}}), "room pattern");
    check(
        json!({"rooms": {"scene:1": "admin"}}),
        "role for room pattern \"scene:1\"",
    );
    check(json!({"rooms": {"scene:1": 3}}), "role");
    check(json!({"rooms": ["scene:1"]}), "'rooms' must be an object");
    check(json!({"sub": ""}), "'sub'");
    check(json!({"sub": "x".repeat(129)}), "'sub'");
    check(json!({"sub": 42}), "malformed claims");
    check(json!({"color": "red;background:url(x)"}), "'color'");
    check(json!({"name": "n".repeat(129)}), "'name'");

    let no_sub = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &json!({"exp": now() + 60}),
    );
    assert!(invalid(auth.verify(&no_sub)).contains("sub"));
    let longest = sign(
        Algorithm::HS256,
        None,
        &hs_key(),
        &with(claims(), json!({"sub": "é".repeat(128)})),
    );
    assert!(auth.verify(&longest).is_ok());
}

#[test]
fn admin_token_gives_the_admin_principal() {
    let auth = authenticator(|c| {
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
    })
    .unwrap();
    assert!(auth.is_admin_token(ADMIN));
    let p = auth.verify_bearer(ADMIN).unwrap();
    assert!(p.admin);
    assert_eq!(p.role_in(&entity("scene:1")), Some(Role::Owner));
    // The admin token is not a user JWT.
    assert!(matches!(auth.verify(ADMIN), Err(AuthError::Invalid(_))));

    // A wrong admin token falls through to JWT verification and fails there.
    for wrong in [
        &ADMIN[..ADMIN.len() - 1],
        "admin-token-0123456789abcdeX",
        "x",
    ] {
        assert!(!auth.is_admin_token(wrong));
        assert_eq!(invalid(auth.verify_bearer(wrong)), "malformed token");
    }
    // A user JWT still works through verify_bearer.
    let jwt = sign(Algorithm::HS256, None, &hs_key(), &claims());
    let user = auth.verify_bearer(&jwt).unwrap();
    assert!(!user.admin);
    assert_eq!(&*user.user_id, "u-1");

    // No admin token configured: nothing is the admin token.
    assert!(!hs_auth().is_admin_token(""));
    assert!(!hs_auth().is_admin_token(ADMIN));
    let debug = format!("{auth:?}");
    assert!(!debug.contains(ADMIN) && !debug.contains(SECRET), "{debug}");
}

#[test]
fn dev_mode_mints_tokens_that_verify() {
    let auth = authenticator(|_| {}).unwrap();
    assert!(auth.is_dev());
    let token = auth.mint_dev_token("alice", None, None).unwrap();
    let p = auth.verify(&token).unwrap();
    assert_eq!(&*p.user_id, "alice");
    assert_eq!(&*p.name, "alice");
    assert_eq!(p.role_in(&entity("scene:1")), Some(Role::Editor));
    assert_eq!(p.role_in(&entity("story:9")), Some(Role::Editor));

    // exp = now + 24 h, HS256.
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["alg"], "HS256");
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(
        exp.abs_diff(now() + DEV_TOKEN_TTL.as_secs()) <= 5,
        "{claims}"
    );

    let rooms = BTreeMap::from([
        ("scene:42".to_owned(), Role::Owner),
        ("scene:*".to_owned(), Role::Viewer),
    ]);
    let token = auth
        .mint_dev_token("bob", Some("Bob B."), Some(rooms))
        .unwrap();
    let p = auth.verify(&token).unwrap();
    assert_eq!(&*p.name, "Bob B.");
    assert_eq!(p.role_in(&entity("scene:42")), Some(Role::Owner));
    assert_eq!(p.role_in(&entity("scene:1")), Some(Role::Viewer));
    assert_eq!(p.role_in(&entity("story:1")), None);

    // Bad input is a bad request, named.
    let bad = BTreeMap::from([("Scene:*".to_owned(), Role::Editor)]);
    let err = auth.mint_dev_token("bob", None, Some(bad)).unwrap_err();
    assert!(
        matches!(&err, AuthError::BadRequest(m) if m.contains("Scene:*")),
        "{err:?}"
    );
    assert_eq!(err.code(), ErrorCode::BadRequest);
    assert!(matches!(
        auth.mint_dev_token("", None, None),
        Err(AuthError::BadRequest(_))
    ));
    assert!(matches!(
        auth.mint_dev_token(&"x".repeat(129), None, None),
        Err(AuthError::BadRequest(_))
    ));

    // Each dev node has its own random secret.
    let other = authenticator(|_| {}).unwrap();
    assert!(
        invalid(other.verify(&auth.mint_dev_token("alice", None, None).unwrap()))
            .contains("signature")
    );
}

#[test]
fn dev_tokens_carry_configured_issuer_and_audience() {
    let auth = authenticator(|c| {
        c.jwt_issuer = Some("dev-iss".into());
        c.jwt_audience = Some("dev-aud".into());
    })
    .unwrap();
    assert!(auth.is_dev());
    let token = auth.mint_dev_token("carol", None, None).unwrap();
    assert_eq!(&*auth.verify(&token).unwrap().user_id, "carol");
}

#[test]
fn minting_is_refused_outside_dev_mode() {
    for auth in [hs_auth(), rs_auth(), jwks_auth()] {
        assert!(!auth.is_dev());
        let err = auth.mint_dev_token("alice", None, None).unwrap_err();
        assert!(matches!(err, AuthError::NotDevMode), "{err:?}");
        assert_eq!(err.code(), ErrorCode::NotFound);
    }
}

#[test]
fn unusable_key_configuration_is_refused() {
    let config_error = |edit: &dyn Fn(&mut Config), expect: &str| match authenticator(edit) {
        Err(AuthError::Config(m)) => assert!(m.contains(expect), "{m:?} should mention {expect:?}"),
        other => panic!("expected Config error, got {other:?}"),
    };
    config_error(
        &|c| c.jwt_public_key = Some(fixture("rsa_private.pem")),
        "private key",
    );
    config_error(
        &|c| c.jwt_public_key = Some(fixture("ec384_public.pem")),
        "P-256",
    );
    config_error(
        &|c| c.jwt_public_key = Some(fixture("jwks.json")),
        "not an RSA or EC",
    );
    config_error(
        &|c| c.jwt_public_key = Some(fixture("missing.pem")),
        "cannot read",
    );
    config_error(
        &|c| c.jwt_jwks = Some(fixture("rsa_public.pem")),
        "not a JWKS",
    );
    config_error(
        &|c| {
            c.jwt_secret = Some(SECRET.into());
            c.jwt_jwks = Some(fixture("jwks.json"));
        },
        "only one",
    );

    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, v: Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
        path
    };
    let only_oct = write(
        "oct.json",
        json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}),
    );
    config_error(&|c| c.jwt_jwks = Some(only_oct.clone()), "no usable");
    let small = write(
        "small.json",
        json!({"keys": [{"kty": "RSA", "kid": "s", "n": URL_SAFE_NO_PAD.encode([0xc5u8; 128]), "e": "AQAB"}]}),
    );
    config_error(&|c| c.jwt_jwks = Some(small.clone()), "1024 bits");
    let full: Value = serde_json::from_slice(&read_fixture("jwks.json")).unwrap();
    let mut dup = full.clone();
    dup["keys"][1]["kid"] = json!("rsa-1");
    let dup = write("dup.json", dup);
    config_error(&|c| c.jwt_jwks = Some(dup.clone()), "twice");
    let mut off_curve = full["keys"][1].clone();
    off_curve["y"] = json!(URL_SAFE_NO_PAD.encode([1u8; 32]));
    let off_curve = write("off.json", json!({"keys": [off_curve]}));
    config_error(&|c| c.jwt_jwks = Some(off_curve.clone()), "P-256 point");
}

#[test]
fn authenticator_is_shareable_across_threads() {
    let auth = rs_auth();
    let token = sign(Algorithm::RS256, None, &rsa_key(), &claims());
    std::thread::scope(|s| {
        for _ in 0..4 {
            let auth = auth.clone();
            let token = token.clone();
            s.spawn(move || assert!(auth.verify(&token).is_ok()));
        }
    });
}

#[test]
fn bearer_header_parsing() {
    assert_eq!(parse_bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
    assert_eq!(parse_bearer("bearer   tok "), Some("tok"));
    assert_eq!(parse_bearer("Basic dXNlcjpwYXNz"), None);
    assert_eq!(parse_bearer("Bearer"), None);
    assert_eq!(parse_bearer("Bearer "), None);
}
