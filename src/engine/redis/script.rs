//! [`LuaScript`]: a Lua script as the engines run it, optionally made **safe to re-send**.
//!
//! # Why
//!
//! fred re-sends a command whose connection closed while it was in flight (up to
//! `max_command_attempts`, default 3) once it has reconnected. When the first send reached
//! Redis and only the reply was lost, a state-changing script then runs twice, and the caller
//! sees only the second result: a release answers `not_held` after it released (and its
//! hand-off is never announced), a reap or `release_session` returns nothing because the first
//! run did the work, a forced release frees the lock it had just handed to the next waiter.
//! Lowering `max_command_attempts` would not help: a lost reply would then look like a failure
//! although the script ran.
//!
//! # How
//!
//! [`LuaScript::once`] wraps the script's body in a function and appends an **op key** to the
//! call's `KEYS`: `<first key's hash-tag part>:op:<op id>`, with a fresh random op id per call
//! (per logical call, not per send: fred re-sends the same arguments). The wrapper looks the op
//! key up first; when present, the script already ran for this call and the wrapper returns the
//! reply stored there, doing nothing else. Otherwise it runs the body, stores its reply
//! (MessagePack, which keeps every Lua value exactly) under the op key with a [`OP_TTL`]
//! expiry, and returns it — in the same atomic script, so "ran" and "reply stored" cannot
//! diverge.
//!
//! A reply that reports nothing (nil, or an empty array) is not stored. **Every `once` script
//! must keep this true: an empty reply means it changed nothing a caller announces** (a reap or
//! session release that found nothing to end, a forced release of a free resource), so a re-run
//! reports only what it did itself and nothing is lost or doubled. The reaper's idle calls (16
//! shards every 100 ms per node) then cost no key.
//!
//! The op key is declared (the last of `KEYS`; no body reads `#KEYS`) and lies in the hash slot
//! of `KEYS[1]` (see [`op_key`]), so Cluster accepts it and fred's routing on the first key is
//! unchanged. Bodies are untouched: the wrapper is text around them, and a body's locals become
//! the function's locals (the prelude's locals are its upvalues; Lua 5.1 allows 60 per function,
//! the largest body, acquire, uses about a dozen).
//!
//! # Limits
//!
//! The stored reply lives [`OP_TTL`]; fred gives up on a command after the client's command
//! timeout ([`super::COMMAND_TIMEOUT`], far shorter), so every re-send of a call arrives while its
//! reply is kept (one arriving later would run as a new call). Evicting op keys (an `allkeys-*`
//! maxmemory policy) reopens the window for the evicted calls. Each call that reports a change costs one small key for [`OP_TTL`] (its reply,
//! a few hundred bytes; a reap batch more).

use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::keys::PREFIX;

/// How long a call's reply is kept for its re-sends. It must outlast fred's retries of one call,
/// which end with the command timeout.
pub const OP_TTL: Duration = Duration::from_secs(60);

const _: () = assert!(OP_TTL.as_millis() >= 4 * super::COMMAND_TIMEOUT.as_millis());

/// A Lua script run with `EVALSHA` (reloaded after `NOSCRIPT`).
pub struct LuaScript {
    script: Script,
    once: bool,
}

impl LuaScript {
    /// A script that may run twice for one call without changing the outcome: reads, and writes
    /// that land the same when repeated (`max`, renewing an expiry, compare-and-delete).
    pub fn plain(lua: impl Into<String>) -> LuaScript {
        LuaScript {
            script: Script::from_lua(lua.into()),
            once: false,
        }
    }

    /// `prelude` (shared helpers; may be empty) and then `body`, run at most once per call (see
    /// the module doc). The body returns the reply as a plain script would.
    pub fn once(prelude: &str, body: &str) -> LuaScript {
        LuaScript {
            script: Script::from_lua(wrap(prelude, body)),
            once: true,
        }
    }

    /// Runs the script on `client`. A `once` script gets this call's op key appended to `keys`.
    pub async fn eval<R: FromValue>(
        &self,
        client: &Client,
        mut keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<R, fred::error::Error> {
        keys = self.call_keys(keys);
        self.script.evalsha_with_reload(client, keys, args).await
    }

    /// `keys` as one call sends them: a `once` script's get this call's op key appended. Every
    /// send of the call must use the same result (see [`super::replication`], which sends the
    /// script itself, inside a pipeline, and re-sends it after a lost connection).
    pub fn call_keys(&self, mut keys: Vec<String>) -> Vec<String> {
        if self.once {
            let first = keys.first().map(String::as_str).unwrap_or("");
            keys.push(op_key(first, &new_op_id()));
        }
        keys
    }

    /// The script's SHA-1, for `EVALSHA`.
    pub fn sha1(&self) -> &str {
        self.script.sha1()
    }

    /// `SCRIPT LOAD`s the script (on every primary of a Cluster), after a `NOSCRIPT`.
    pub async fn load(&self, client: &Client) -> Result<(), fred::error::Error> {
        self.script.load(client).await
    }
}

/// The text of a `once` script. The newlines keep a body's last line (a comment, say) apart
/// from the `end` that closes it.
fn wrap(prelude: &str, body: &str) -> String {
    format!(
        "{prelude}\nlocal function lockstep_body()\n{body}\nend\n\
         -- Idempotency (src/engine/redis/script.rs): KEYS[#KEYS] is this call's op key.\n\
         local lockstep_op = KEYS[#KEYS]\n\
         local lockstep_done = redis.call('GET', lockstep_op)\n\
         if lockstep_done then\n\
         \x20   return cmsgpack.unpack(lockstep_done)\n\
         end\n\
         local lockstep_reply = lockstep_body()\n\
         if lockstep_reply and (type(lockstep_reply) ~= 'table' or next(lockstep_reply)) then\n\
         \x20   redis.call('SET', lockstep_op, cmsgpack.pack(lockstep_reply), 'PX', {ttl})\n\
         end\n\
         return lockstep_reply\n",
        ttl = OP_TTL.as_millis()
    )
}

/// A fresh op id: 128 random bits, so two calls never share one.
fn new_op_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The op key of a call whose first key is `first`, in `first`'s hash slot:
/// - `first` has a hash tag (`…{tag}…`): the part of `first` up to the tag's `}`, then
///   `:op:<id>` (`lockstep:ls:{ls3}:lock:r` → `lockstep:ls:{ls3}:op:<id>`), beside its data;
/// - otherwise Redis hashes all of `first`, and `lockstep:op:{<first>}:<id>` has `first` as its
///   tag. A key with a `}` but no valid tag (`a{}b`) cannot be wrapped so; ours never are (names
///   exclude braces), and a client-chosen resume token that is would only fail its own claim in
///   Cluster (`CROSSSLOT`).
pub fn op_key(first: &str, op_id: &str) -> String {
    match tag_end(first) {
        Some(end) => format!("{}:op:{op_id}", &first[..=end]),
        None => format!("{PREFIX}op:{{{first}}}:{op_id}"),
    }
}

/// Index of the `}` closing `key`'s hash tag, when it has one (Redis' rule: the first `{`, the
/// first `}` after it, and at least one byte between).
fn tag_end(key: &str) -> Option<usize> {
    let open = key.find('{')?;
    let close = open + 1 + key[open + 1..].find('}')?;
    (close > open + 1).then_some(close)
}

#[cfg(test)]
mod tests {
    use fred::util::redis_keyslot;

    use super::*;
    use crate::engine::redis::keys;

    #[test]
    fn op_keys_share_the_first_keys_slot() {
        for first in [
            keys::lock("segment:42-7"),
            keys::due(3),
            keys::members("scene:42"),
            keys::presence_rooms(),
            keys::resume("q8Y-_tok3n"),
            "a{b".to_owned(),
            "{x}".to_owned(),
        ] {
            let op = op_key(&first, &new_op_id());
            assert_eq!(
                redis_keyslot(op.as_bytes()),
                redis_keyslot(first.as_bytes()),
                "{first} vs {op}"
            );
            assert!(
                op.contains(":op:") || op.starts_with("lockstep:op:"),
                "{op}"
            );
        }
        assert_eq!(
            op_key("lockstep:ls:{ls3}:lock:scene:1", "i"),
            "lockstep:ls:{ls3}:op:i"
        );
        assert_eq!(
            op_key("lockstep:resume:t", "i"),
            "lockstep:op:{lockstep:resume:t}:i"
        );
    }

    #[test]
    fn op_ids_are_fresh() {
        assert_ne!(new_op_id(), new_op_id());
    }

    #[test]
    fn the_body_is_a_function_and_its_last_comment_cannot_swallow_end() {
        let text = wrap("local X = 1", "return {X} -- trailing comment");
        assert!(
            text.contains("return {X} -- trailing comment\nend\n"),
            "{text}"
        );
        assert!(text.contains("'PX', 60000"), "{text}");
        assert!(text.contains("next(lockstep_reply)"), "{text}");
    }
}
