//! Lease renewal for the locks this node's sessions hold, and the watchdog that tells their
//! holders when renewals stopped reaching Redis for too long.
//!
//! A WebSocket-held lock lives in the store only as long as its lease (`LOCKSTEP_LOCK_LEASE`),
//! which this node renews every third of the lease ([`renew`]). If the node cannot reach Redis
//! (a partition, a blackholed connection: a renewal then hangs up to fred's command timeout),
//! the leases run out and another node may grant the same locks, while the holders here still
//! believe they hold them. The watchdog ([`check`], on its own timer, never inside the renewal
//! task, which may be stuck in a call) declares such locks **lost** before that can happen:
//! the holder and this node's members of the lock's room get `lock.released {reason: "lost"}`
//! through the hub directly (pub/sub goes through the same unreachable Redis), the lock leaves
//! the session's held set so it is never renewed again, `lockstep_lock_outcomes_total
//! {outcome="lost"}` counts it, and one warning is logged per outage.
//!
//! # When a lock is declared lost
//!
//! Each held lock has a *base*: the instant, by this node's monotonic clock, just **before** the
//! last request that started or renewed its lease was sent. The store starts the lease when
//! its script runs, which is after the send, so `base + lease` is a lower bound of the instant
//! another node may grant the lock (Redis' clock decides there; the assumption is that the two
//! clocks run at the same rate — NTP slews by at most 500 ppm, 5 ms over a 10 s lease). The
//! lock is declared lost at `base + lease - margin` ([`notice_margin`]). The base is:
//!
//! - a direct grant on this node: the instant before its acquire was sent ([`Leases::granted`]);
//! - after a renewal that answered and did not report the lock gone: the instant before that
//!   renewal was sent. A renewal that failed (an error, a timeout, a replication acknowledgement
//!   that did not come) renews nothing here, whatever Redis did with it;
//! - a lock this node learned of otherwise (a queued acquire served by a hand-off, a resume
//!   from another node) and has not renewed yet: the instant the watchdog first saw it, minus
//!   one watchdog period. Its lease started a little earlier (a hand-off: when the releasing
//!   script ran, before its fence registration and pub/sub delivery; a resume: at the old
//!   node's last renewal, or stretched over the grace by a draining node), which the margin
//!   has to absorb; earlier would make every such lock lost unless a renewal, which runs on
//!   its own period, happened to come first. The first acknowledged renewal sets the exact
//!   base.
//!
//! A declared-lost lock stays lost: if Redis comes back, its lease is not renewed and it lapses
//! in the store, where the reaper announces it as `disconnected` to other nodes' members (this
//! node's members saw `lost` for that token; the hub drops the duplicate). The holder may
//! acquire again. Locks held over HTTP have no lease and are not watched: they live to their
//! hold limit.
//!
//! The watchdog only knows what `refresh_leases` tells it, so a store must fail the whole call
//! when any part of it failed (the Redis store does: one failed or unacknowledged shard fails
//! the call), never report a partial renewal as a success.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Node;
use crate::engine::{
    EventSink, Holder, LockInfo, LockKey, ReleaseReason, RoomEvent, RoomEventKind, SessionId,
};
use crate::protocol::ServerMessage;
use crate::session::handle::SessionHandle;

/// The watchdog's period at most; shorter for short leases ([`check_period`]).
const MAX_CHECK_PERIOD: Duration = Duration::from_millis(250);

/// How long before `base + lease` a lock is declared lost: `max(lease / 5, 1 s)`, but at most
/// a third of the lease.
///
/// The margin covers the watchdog's period (up to 250 ms late), putting the notice on the
/// socket and carrying it to the client (a loaded node, a slow network: hundreds of ms), with
/// room to spare; a fifth of the lease scales with deployments that chose long leases for slow
/// networks. The cap keeps two thirds of the lease for renewals (sent every third), so one
/// renewal slower than a third of the lease is tolerated without a false notice. With the
/// default 10 s lease: declared lost 8 s after the last acknowledged renewal was sent, 2 s
/// before anyone else can be granted the lock.
pub fn notice_margin(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_secs(1)).min(lease / 3)
}

/// The watchdog's period: a quarter of the margin, at most [`MAX_CHECK_PERIOD`].
pub fn check_period(lease: Duration) -> Duration {
    (notice_margin(lease) / 4).clamp(Duration::from_millis(10), MAX_CHECK_PERIOD)
}

/// One held lock as the watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Watched {
    token: u64,
    /// Sent-instant of the last request known to have started or renewed its lease.
    base: Instant,
}

/// A held lock: the session holding it, the lock and its token.
pub type HeldLock = (SessionId, LockKey, u64);

/// The bookkeeping of lease bases, shared by the grant path, the renewal task and the watchdog.
pub struct Leases {
    lease: Duration,
    margin: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    watched: HashMap<(SessionId, LockKey), Watched>,
    /// Locks declared lost, kept until their lease has surely run out: a reentrant acquire
    /// gets the same token back without renewing the lease, and must not start afresh.
    lost: HashMap<(SessionId, LockKey), Watched>,
    /// A loss was logged at warn since the last successful renewal.
    reported: bool,
}

impl Leases {
    pub fn new(lease: Duration) -> Leases {
        Leases {
            lease,
            margin: notice_margin(lease),
            state: Mutex::new(State::default()),
        }
    }

    // A std Mutex: held for map updates only, never across an await.
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A direct grant to `session`, whose acquire was sent at `sent`. Call after the session
    /// holds it.
    pub fn granted(&self, session: &SessionId, key: LockKey, token: u64, sent: Instant) {
        let mut s = self.state();
        s.lost.remove(&(session.clone(), key.clone()));
        s.watched
            .insert((session.clone(), key), Watched { token, base: sent });
    }

    /// A renewal sent at `sent` answered, and these grants were not reported gone: each lease
    /// runs at least until `sent + lease`. A grant that is no longer held by the time of the
    /// next check (declared lost meanwhile, released) is dropped there.
    pub fn renewed(&self, grants: &[HeldLock], sent: Instant) {
        let mut s = self.state();
        s.reported = false;
        for (session, key, token) in grants {
            let id = (session.clone(), key.clone());
            // Also held again after it was declared lost (a reentrant acquire): this renewal
            // restarted its lease.
            s.lost.remove(&id);
            match s.watched.get_mut(&id) {
                Some(w) if w.token == *token => w.base = w.base.max(sent),
                _ => {
                    let w = Watched {
                        token: *token,
                        base: sent,
                    };
                    s.watched.insert(id, w);
                }
            }
        }
    }

    /// The renewal reported these grants gone: they are announced as expired elsewhere.
    fn forget(&self, grants: &[HeldLock]) {
        let mut s = self.state();
        for (session, key, _) in grants {
            s.watched.remove(&(session.clone(), key.clone()));
        }
    }

    /// Compares what is held now (`held`, read under the bookkeeping's lock so that a grant
    /// recorded by [`granted`](Self::granted) is never dropped as not held) with the bases and
    /// returns the locks whose notice is due at `now`. They are forgotten, and remembered as
    /// lost until their lease surely ended.
    fn due(&self, now: Instant, held: impl FnOnce() -> Vec<HeldLock>) -> (Vec<HeldLock>, bool) {
        let mut s = self.state();
        let held = held();
        let mut watched = HashMap::with_capacity(held.len());
        let mut due = Vec::new();
        let unknown_base = now.checked_sub(check_period(self.lease)).unwrap_or(now);
        for (session, key, token) in held {
            let id = (session.clone(), key.clone());
            let known = |w: Option<Watched>| w.filter(|w| w.token == token);
            let w = known(s.watched.get(&id).copied())
                .or_else(|| known(s.lost.get(&id).copied()))
                .unwrap_or(Watched {
                    token,
                    base: unknown_base,
                });
            if now >= w.base + (self.lease - self.margin) {
                s.lost.insert(id, w);
                due.push((session, key, token));
            } else {
                watched.insert(id, w);
            }
        }
        s.watched = watched;
        let lease = self.lease;
        s.lost.retain(|_, w| now < w.base + 2 * lease);
        let first = !due.is_empty() && !s.reported;
        if !due.is_empty() {
            s.reported = true;
        }
        (due, first)
    }
}

/// The lock `key` held with `token` by `h`, as a release event needs it.
fn lock_of(node: &Node, h: &SessionHandle, key: &LockKey, token: u64) -> LockInfo {
    LockInfo {
        room: key.room.clone(),
        resource: key.resource.clone(),
        token,
        holder: Holder {
            user_id: h.principal.user_id.clone(),
            name: h.principal.name.clone(),
            session_id: h.id.clone(),
            node_id: node.id.clone(),
        },
        action: Arc::from(""),
        since: 0,
        expires_at: 0,
    }
}

/// `sessions` by id: the renewal and the watchdog look up the holder of every lock they end,
/// and in an outage that is every lock of the node — a scan per lock would be quadratic.
fn by_id(sessions: &[Arc<SessionHandle>]) -> HashMap<&str, &Arc<SessionHandle>> {
    sessions.iter().map(|h| (&*h.id, h)).collect()
}

fn held_by(sessions: &[Arc<SessionHandle>]) -> Vec<HeldLock> {
    sessions
        .iter()
        .flat_map(|h| {
            h.held()
                .into_iter()
                .map(|(key, token)| (h.id.clone(), key, token))
        })
        .collect()
}

/// Renews the leases of every lock held by this node's sessions (attached or parked). A lock
/// found gone (reaped elsewhere, or lost with an emptied Redis) is announced as expired; a
/// duplicate of an announcement already made is dropped by every hub (same token).
pub(super) async fn renew(node: &Node) {
    let sessions = node.hub.sessions();
    let held = held_by(&sessions);
    if held.is_empty() {
        return;
    }
    let grants: Vec<(LockKey, u64)> = held.iter().map(|(_, k, t)| (k.clone(), *t)).collect();
    let lease_ms = node.config.lock_lease.as_millis() as u64;
    // Before the send: the lease the store starts runs from a later instant.
    let sent = Instant::now();
    let gone = match node.locks.refresh_leases(&grants, lease_ms).await {
        Ok(gone) => gone,
        Err(e) => {
            // Renews nothing: the watchdog tells the holders if this goes on.
            tracing::warn!(error = %e, "lease renewal failed");
            return;
        }
    };
    // A Redis that lost its data reports every lock gone: no scan of `gone` per held lock.
    let gone: HashSet<(LockKey, u64)> = gone.into_iter().collect();
    let (gone, renewed): (Vec<HeldLock>, Vec<HeldLock>) = held
        .into_iter()
        .partition(|(_, k, t)| gone.contains(&(k.clone(), *t)));
    node.leases.renewed(&renewed, sent);
    node.leases.forget(&gone);
    let holders = by_id(&sessions);
    for (session, key, token) in gone {
        let Some(h) = holders.get(&*session) else {
            continue;
        };
        if !h.holds(&key, token) {
            continue;
        }
        h.unhold(&key, token);
        let kind = RoomEventKind::LockReleased {
            lock: lock_of(node, h, &key, token),
            reason: ReleaseReason::Expired,
        };
        node.publish(&key.room, None, kind).await;
    }
}

/// The watchdog: declares lost every held lock whose lease may run out before a renewal is
/// acknowledged (module doc), and tells its holder and this node's members of its room.
pub(super) fn check(node: &Node) {
    let now = Instant::now();
    let mut sessions = Vec::new();
    let (due, first) = node.leases.due(now, || {
        sessions = node.hub.sessions();
        held_by(&sessions)
    });
    if due.is_empty() {
        return;
    }
    let lease = node.config.lock_lease;
    if first {
        tracing::warn!(
            locks = due.len(),
            lease_ms = lease.as_millis() as u64,
            "no lease renewal acknowledged by Redis in time: telling holders their locks are lost"
        );
    } else {
        tracing::info!(locks = due.len(), "more locks declared lost");
    }
    let holders = by_id(&sessions);
    for (session, key, token) in due {
        let Some(h) = holders.get(&*session) else {
            continue;
        };
        if !h.holds(&key, token) {
            continue;
        }
        h.unhold(&key, token);
        node.metrics.lock_outcome(ReleaseReason::Lost.as_str());
        // Straight to this node's hub: the broker publishes through the unreachable Redis.
        // Other nodes' members learn of the end when the lease lapses (`disconnected`, as any lapsed lease).
        node.hub.deliver(Arc::new(RoomEvent {
            room: key.room.clone(),
            origin: None,
            kind: RoomEventKind::LockReleased {
                lock: lock_of(node, h, &key, token),
                reason: ReleaseReason::Lost,
            },
        }));
        // A holder that left the room still holds the locks it announced there.
        let member = node
            .hub
            .members_of(&key.room)
            .iter()
            .any(|m| Arc::ptr_eq(m, h));
        if !member {
            h.send(&ServerMessage::LockReleased {
                room: &key.room,
                resource: &key.resource,
                reason: ReleaseReason::Lost,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Entity;

    const LEASE: Duration = Duration::from_secs(3);

    fn key(res: &str) -> LockKey {
        LockKey::new(
            Entity::parse("scene:1").unwrap(),
            Entity::parse(res).unwrap(),
        )
    }

    fn held(session: &str, res: &str, token: u64) -> HeldLock {
        (Arc::from(session), key(res), token)
    }

    fn due_at(l: &Leases, now: Instant, h: &[HeldLock]) -> Vec<HeldLock> {
        l.due(now, || h.to_vec()).0
    }

    #[test]
    fn the_margin_covers_delivery_and_leaves_two_thirds_for_renewals() {
        let s = Duration::from_secs;
        assert_eq!(notice_margin(s(10)), s(2));
        assert_eq!(notice_margin(s(30)), s(6));
        assert_eq!(notice_margin(s(3)), s(1));
        assert_eq!(notice_margin(s(1)), s(1) / 3);
        assert_eq!(check_period(s(10)), MAX_CHECK_PERIOD);
        assert_eq!(check_period(s(1)), s(1) / 12);
    }

    #[test]
    fn a_grant_is_lost_at_its_own_send_plus_lease_minus_margin_not_before() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let a = held("s1", "segment:a", 7);
        l.granted(&a.0, a.1.clone(), 7, t0);
        let deadline = t0 + LEASE - notice_margin(LEASE);
        let just_before = deadline - Duration::from_millis(1);
        assert!(due_at(&l, just_before, std::slice::from_ref(&a)).is_empty());
        assert_eq!(due_at(&l, deadline, std::slice::from_ref(&a)), vec![a]);
    }

    #[test]
    fn an_acknowledged_renewal_moves_the_base_to_its_send_and_a_failed_one_does_not() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let a = held("s1", "segment:a", 7);
        let b = held("s1", "segment:b", 8);
        l.granted(&a.0, a.1.clone(), 7, t0);
        l.granted(&b.0, b.1.clone(), 8, t0);
        let both = [a.clone(), b.clone()];
        let renewal = t0 + Duration::from_secs(1);
        // Only `a` was acknowledged (`b`'s renewal failed).
        l.renewed(std::slice::from_ref(&a), renewal);
        let b_deadline = t0 + LEASE - notice_margin(LEASE);
        assert_eq!(due_at(&l, b_deadline, &both), vec![b.clone()]);
        // Declared lost, `b` is no longer held.
        let rest = [a.clone()];
        let a_deadline = renewal + LEASE - notice_margin(LEASE);
        assert!(due_at(&l, a_deadline - Duration::from_millis(1), &rest).is_empty());
        assert_eq!(due_at(&l, a_deadline, &rest), vec![a]);
    }

    #[test]
    fn a_lock_granted_after_the_last_renewal_keeps_its_own_later_deadline() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let a = held("s1", "segment:a", 7);
        l.granted(&a.0, a.1.clone(), 7, t0);
        l.renewed(std::slice::from_ref(&a), t0 + Duration::from_millis(500));
        let later = held("s2", "segment:b", 9);
        let granted_at = t0 + Duration::from_millis(1500);
        l.granted(&later.0, later.1.clone(), 9, granted_at);
        let both = [a.clone(), later.clone()];
        let a_deadline = t0 + Duration::from_millis(500) + LEASE - notice_margin(LEASE);
        assert_eq!(due_at(&l, a_deadline, &both), vec![a]);
        // Declared lost, `a` is no longer held.
        let rest = [later.clone()];
        let own = granted_at + LEASE - notice_margin(LEASE);
        assert!(due_at(&l, own - Duration::from_millis(1), &rest).is_empty());
        assert_eq!(due_at(&l, own, &rest), vec![later]);
    }

    #[test]
    fn a_lock_learned_of_otherwise_counts_from_one_check_period_before_it_was_seen() {
        let l = Leases::new(LEASE);
        let seen = Instant::now() + Duration::from_secs(10);
        let a = held("s1", "segment:a", 7);
        assert!(due_at(&l, seen, std::slice::from_ref(&a)).is_empty());
        let deadline = seen - check_period(LEASE) + LEASE - notice_margin(LEASE);
        assert!(
            due_at(
                &l,
                deadline - Duration::from_millis(1),
                std::slice::from_ref(&a)
            )
            .is_empty()
        );
        assert_eq!(due_at(&l, deadline, std::slice::from_ref(&a)), vec![a]);
    }

    #[test]
    fn a_lost_lock_held_again_with_its_token_is_still_lost_until_a_renewal_succeeds() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let a = held("s1", "segment:a", 7);
        l.granted(&a.0, a.1.clone(), 7, t0);
        let deadline = t0 + LEASE - notice_margin(LEASE);
        assert_eq!(due_at(&l, deadline, std::slice::from_ref(&a)).len(), 1);
        // Not held for a while, then held again (a reentrant acquire: same token, no renewal).
        assert!(due_at(&l, deadline + Duration::from_millis(10), &[]).is_empty());
        let again = deadline + Duration::from_millis(20);
        assert_eq!(due_at(&l, again, std::slice::from_ref(&a)).len(), 1);
        // Once a renewal answers, it counts from that renewal.
        let renewal = again + Duration::from_millis(10);
        l.renewed(std::slice::from_ref(&a), renewal);
        assert!(
            due_at(
                &l,
                renewal + Duration::from_millis(100),
                std::slice::from_ref(&a)
            )
            .is_empty()
        );
    }

    #[test]
    fn the_first_loss_of_an_outage_is_reported_once() {
        let l = Leases::new(LEASE);
        let t0 = Instant::now();
        let a = held("s1", "segment:a", 7);
        let b = held("s1", "segment:b", 8);
        l.granted(&a.0, a.1.clone(), 7, t0);
        l.granted(&b.0, b.1.clone(), 8, t0 + Duration::from_millis(100));
        let d = t0 + LEASE - notice_margin(LEASE);
        assert!(l.due(d, || vec![a.clone(), b.clone()]).1);
        assert!(!l.due(d + Duration::from_millis(100), || vec![b.clone()]).1);
        l.renewed(&[], d + Duration::from_secs(1));
        // A later outage is reported again.
        let c = held("s1", "segment:c", 9);
        let far = d + Duration::from_secs(10);
        assert!(!l.due(far, || vec![c.clone()]).1);
        assert!(l.due(far + LEASE, || vec![c.clone()]).1);
    }
}
