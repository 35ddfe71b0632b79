//! One member of the studio workload: its connect and join, then its schedule (cursors,
//! focus changes, an editor's lock cycle) and what it hears, until the driver stops it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant as TokioInstant;

use super::report::*;
use super::{Shared, Spec};
use crate::bench;
use crate::client::{Answer, ClientError, Conn, Target};

/// splitmix64: phases and resource picks, without a dependency.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random point in `[0, period)`.
fn phase(seed: u64, period: Duration) -> Duration {
    let f = (mix(seed) >> 11) as f64 / (1u64 << 53) as f64;
    period.mul_f64(f)
}

/// Where an editor's lock cycle is.
enum Lock {
    /// Next acquire at this time.
    Idle(TokioInstant),
    Acquiring {
        id: u32,
        sent: Instant,
        resource: String,
    },
    Holding {
        resource: String,
        token: u64,
        until: TokioInstant,
    },
    Releasing {
        id: u32,
        sent: Instant,
    },
}

/// One member: connect and join (holding a ramp permit), then its schedule until `stop`.
pub(super) async fn member(
    sh: Arc<Shared>,
    spec: Spec,
    target: Target,
    token: String,
    permit: OwnedSemaphorePermit,
    stop: watch::Receiver<bool>,
) {
    let a = &sh.args;
    let timeout = Duration::from_secs(a.timeout_secs.max(1));
    let room = format!("scene:scale-{}", spec.room);
    let joined = async {
        let mut conn = Conn::connect(&target, &token, timeout).await?;
        bench::join(&mut conn, &room, 1, timeout).await?;
        Ok::<_, ClientError>(conn)
    }
    .await;
    drop(permit);
    let conn = match joined {
        Ok(c) => {
            sh.joined.fetch_add(1, Ordering::Relaxed);
            c
        }
        Err(e) => {
            eprintln!("scale: {room} member {}: {e}", spec.member);
            sh.error(e.kind());
            sh.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if let Err(e) = member_loop(&sh, spec, &room, conn, stop, timeout).await {
        sh.error(e.kind());
    }
}

async fn member_loop(
    sh: &Shared,
    spec: Spec,
    room: &str,
    mut conn: Conn,
    mut stop: watch::Receiver<bool>,
    timeout: Duration,
) -> Result<(), ClientError> {
    let a = &sh.args;
    let seed = spec.global as u64;
    let now = TokioInstant::now();
    let cursor_every = Duration::from_secs_f64(1.0 / a.cursor_hz.max(0.001));
    let presence_every = Duration::from_secs_f64(a.presence_every_s.max(0.01));
    let lock_every = Duration::from_secs_f64(a.lock_every_s.max(0.01));
    let mut next_cursor =
        (spec.member < a.cursor_senders).then(|| now + phase(seed ^ 1, cursor_every));
    let mut next_presence = now + phase(seed ^ 2, presence_every);
    let editor = spec.member >= a.members - a.editors;
    let mut lock = editor.then(|| Lock::Idle(now + phase(seed ^ 3, lock_every)));
    let mut next_id: u32 = 1;
    let mut cycle: u64 = 0;
    let mut seq: u64 = 0;

    let due = |c: &Option<TokioInstant>, p: TokioInstant, l: &Option<Lock>| {
        let mut d = p;
        if let Some(c) = c {
            d = d.min(*c);
        }
        match l {
            Some(Lock::Idle(t)) => d = d.min(*t),
            Some(Lock::Holding { until, .. }) => d = d.min(*until),
            Some(Lock::Acquiring { sent, .. } | Lock::Releasing { sent, .. }) => {
                d = d.min(TokioInstant::from_std(*sent + timeout))
            }
            None => {}
        }
        d
    };
    let sleep = tokio::time::sleep_until(due(&next_cursor, next_presence, &lock));
    tokio::pin!(sleep);

    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            () = &mut sleep => {
                let now = TokioInstant::now();
                if let Some(t) = next_cursor.as_mut().filter(|t| **t <= now) {
                    let x = sh.now_us();
                    conn.send(&json!({ "type": "cursor", "room": room, "x": x, "y": spec.member }))
                        .await?;
                    sh.count(C_CURSORS_SENT);
                    *t += cursor_every;
                }
                if next_presence <= now {
                    seq += 1;
                    let focus = format!("segment:s{}-{}-{seq}-{}", spec.room, spec.member, sh.now_us());
                    conn.send(&json!({ "type": "presence", "room": room, "focus": focus })).await?;
                    sh.count(C_PRESENCE_SENT);
                    next_presence += presence_every;
                }
                if let Some(l) = lock.as_mut() {
                    step_lock(sh, spec, room, &mut conn, l, &mut next_id, &mut cycle, lock_every, timeout, now)
                        .await?;
                }
                sleep.as_mut().reset(due(&next_cursor, next_presence, &lock));
            }
            r = conn.recv() => {
                let frame = r?;
                let reset = on_frame(sh, spec, &frame, &mut lock, lock_every);
                if reset {
                    sleep.as_mut().reset(due(&next_cursor, next_presence, &lock));
                }
            }
        }
    }

    // Wind-down: a holder releases (unmeasured), so nobody hears `disconnected` for it.
    if let Some(Lock::Holding {
        resource, token, ..
    }) = &lock
    {
        forget(sh, resource, spec.global);
        let msg = json!({ "type": "lock.release", "id": 0x7fff_fff0u32, "room": room, "resource": resource, "token": token });
        if let Ok(Answer::Err { code, .. }) = conn
            .request(&msg, 0x7fff_fff0, timeout, "lock.release")
            .await
        {
            sh.error(format!("server:{code}"));
        }
    }
    conn.close(Duration::from_secs(2)).await;
    Ok(())
}

/// Advances an editor's lock cycle when one of its times has come.
#[allow(clippy::too_many_arguments)]
async fn step_lock(
    sh: &Shared,
    spec: Spec,
    room: &str,
    conn: &mut Conn,
    l: &mut Lock,
    next_id: &mut u32,
    cycle: &mut u64,
    lock_every: Duration,
    timeout: Duration,
    now: TokioInstant,
) -> Result<(), ClientError> {
    let a = &sh.args;
    match l {
        Lock::Idle(t) if *t <= now => {
            *cycle += 1;
            let k = mix((spec.global as u64) << 20 ^ *cycle) % a.lock_resources as u64;
            let resource = format!("segment:s{}-{k}", spec.room);
            *next_id = next_id.wrapping_add(1).max(2);
            let msg = json!({
                "type": "lock.acquire", "id": *next_id, "room": room, "resource": resource,
                "action": "approve", "ttl_ms": a.lock_ttl_ms,
            });
            let sent = Instant::now();
            conn.send(&msg).await?;
            sh.count(C_ACQUIRES);
            *l = Lock::Acquiring {
                id: *next_id,
                sent,
                resource,
            };
        }
        Lock::Holding {
            resource,
            token,
            until,
        } if *until <= now => {
            forget(sh, resource, spec.global);
            *next_id = next_id.wrapping_add(1).max(2);
            let msg = json!({
                "type": "lock.release", "id": *next_id, "room": room, "resource": resource, "token": *token,
            });
            let sent = Instant::now();
            conn.send(&msg).await?;
            sh.count(C_RELEASES);
            *l = Lock::Releasing { id: *next_id, sent };
        }
        Lock::Acquiring { sent, .. } | Lock::Releasing { sent, .. }
            if now.into_std() >= *sent + timeout =>
        {
            sh.error(match l {
                Lock::Acquiring { .. } => "timeout:lock.acquire",
                _ => "timeout:lock.release",
            });
            *l = Lock::Idle(now + lock_every);
        }
        _ => {}
    }
    Ok(())
}

/// Drops `resource` from the driver's view if `who` holds it there.
fn forget(sh: &Shared, resource: &str, who: usize) {
    let mut held = sh.held.lock().unwrap_or_else(|e| e.into_inner());
    if held.get(resource) == Some(&who) {
        held.remove(resource);
    }
}

/// Handles one frame; true when the lock cycle moved (its next time changed).
fn on_frame(sh: &Shared, spec: Spec, f: &Value, lock: &mut Option<Lock>, every: Duration) -> bool {
    sh.count(C_FRAMES);
    let kind = f["type"].as_str().unwrap_or("");
    match kind {
        "cursor" => {
            sh.count(C_CURSORS_DELIVERED);
            let (Some(x), Some(from)) = (f["x"].as_f64(), member_of(f["user_id"].as_str())) else {
                sh.error("protocol:cursor");
                return false;
            };
            let us = sh.now_us().saturating_sub(x as u64);
            let cross = from % sh.args.urls.len() != spec.node;
            sh.record(if cross { H_CURSOR_CROSS } else { H_CURSOR_SAME }, us);
            false
        }
        "presence.update" => {
            let m = &f["member"];
            let from = member_of(m["user_id"].as_str());
            // segment:s{room}-{member}-{seq}-{µs}
            let at = m["focus"]
                .as_str()
                .and_then(|s| s.rsplit('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if let (Some(from), Some(at)) = (from, at)
                && from != spec.member
            {
                sh.count(C_PRESENCE_DELIVERED);
                let cross = from % sh.args.urls.len() != spec.node;
                let us = sh.now_us().saturating_sub(at);
                sh.record(
                    if cross {
                        H_PRESENCE_CROSS
                    } else {
                        H_PRESENCE_SAME
                    },
                    us,
                );
            } else {
                sh.count(C_OTHER);
            }
            false
        }
        "lock.acquired" | "lock.released" => {
            sh.count(C_LOCK_EVENTS);
            // A holder hearing its lock end for a reason other than its own release lost it.
            // (`released` is left out: the previous holder's release may reach the room after
            // this member's grant, which comes straight from its node.)
            if kind == "lock.released"
                && let Some(Lock::Holding { resource, .. }) = lock.as_ref()
                && f["resource"].as_str() == Some(resource)
                && f["reason"].as_str() != Some("released")
            {
                let why = f["reason"].as_str().unwrap_or("?");
                sh.lost(format!("released:{why}"));
                forget(sh, resource, spec.global);
                *lock = Some(Lock::Idle(TokioInstant::now() + every));
                return true;
            }
            false
        }
        "reply" | "error" => on_answer(sh, spec, f, lock, every),
        "reconnect" => {
            sh.error("server:reconnect");
            false
        }
        _ => {
            sh.count(C_OTHER);
            false
        }
    }
}

/// A `reply` or `error`: the answer to this member's lock request, or an error to count.
fn on_answer(sh: &Shared, spec: Spec, f: &Value, lock: &mut Option<Lock>, every: Duration) -> bool {
    let id = f["id"].as_u64();
    let code = f["code"].as_str();
    let Some(l) = lock.as_mut() else {
        if let Some(c) = code {
            sh.error(format!("server:{c}"));
        }
        return false;
    };
    match l {
        Lock::Acquiring {
            id: want,
            sent,
            resource,
        } if id == Some(u64::from(*want)) => {
            sh.record(H_ACQUIRE, sent.elapsed().as_micros() as u64);
            let next = TokioInstant::from_std(*sent) + every;
            match (code, f["token"].as_u64()) {
                (None, Some(token)) => {
                    sh.count(C_GRANTS);
                    let mut held = sh.held.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(prev) = held.insert(resource.clone(), spec.global)
                        && prev != spec.global
                    {
                        sh.lost("overlap:previous_holder_never_released");
                    }
                    drop(held);
                    let until = TokioInstant::now() + Duration::from_millis(sh.args.lock_hold_ms);
                    *l = Lock::Holding {
                        resource: std::mem::take(resource),
                        token,
                        until,
                    };
                }
                (Some("lock_held"), _) => {
                    sh.count(C_HELD);
                    *l = Lock::Idle(next);
                }
                (Some(c), _) => {
                    sh.error(format!("server:{c}"));
                    *l = Lock::Idle(next);
                }
                (None, None) => {
                    sh.error("protocol:grant_without_token");
                    *l = Lock::Idle(next);
                }
            }
            true
        }
        Lock::Releasing { id: want, sent } if id == Some(u64::from(*want)) => {
            sh.record(H_RELEASE, sent.elapsed().as_micros() as u64);
            if let Some(c) = code {
                // The server did not know us as the holder any more: the lock was lost.
                sh.error(format!("server:{c}"));
                sh.lost(format!("release_refused:{c}"));
            }
            // Cycles are every `every` from the acquire; the hold is much shorter.
            let hold = Duration::from_millis(sh.args.lock_hold_ms);
            *l = Lock::Idle(TokioInstant::now() + every.saturating_sub(hold));
            true
        }
        _ => {
            if let Some(c) = code {
                sh.error(format!("server:{c}"));
            }
            false
        }
    }
}

/// The member index in a user id `…-r{room}-m{member}`.
fn member_of(user_id: Option<&str>) -> Option<usize> {
    user_id?.rsplit("-m").next()?.parse().ok()
}
