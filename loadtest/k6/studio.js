// k6 scenario: a studio session against a lockstep cluster, over the JSON subprotocol.
//
//   k6 run -e LOCKSTEP_URLS=http://127.0.0.1:8081,http://127.0.0.1:8082 \
//          -e LOCKSTEP_JWT_SECRET=... -e VUS=200 -e DURATION=60s loadtest/k6/studio.js
//   (loadtest/k6-local.sh starts a local cluster and runs this for you.)
//
// What each VU does (one VU = one browser tab of one user; one iteration = the whole session):
//
//   1. Signs its own HS256 token (k6/crypto) with LOCKSTEP_JWT_SECRET: user `k6-u<VU>`, role
//      `editor` for EDITOR_PERCENT % of the VUs (default 30), `viewer` for the rest, on `scene:*`.
//   2. Picks node (VU - 1) mod N from LOCKSTEP_URLS, waits a random 0..RAMP_SECONDS, opens
//      `/v1/ws?token=…` with subprotocol `lockstep.v1.json` and joins `scene:k6-<(VU - 1) mod
//      SCENES>` (SCENES defaults to VUS / 10: rooms of about 10 people, spread over all nodes).
//   3. Until the scenario's DURATION is up:
//      - every VU moves its cursor CURSOR_HZ times a second (`cursor {x, y, selection}`;
//        `selection.t` is the send time, so every other member measures the fan-out);
//      - every VU changes its focus to a random segment of its scene every 1.5–4.5 s
//        (`presence {focus, state: {seq, t}}`); the VU times its own `presence.update` coming
//        back through the room (through Redis pub/sub on a multi-node cluster), and the other
//        members time the same update from `state.t`;
//      - editors, every 1–3 s when they hold nothing and have nothing pending, `lock.acquire` a
//        random one of SEGMENTS segments of their scene (action approve|trim|regenerate, ttl
//        30 s); one in three asks to `wait` (wait_timeout_ms 8 s). A grant (reply or
//        `lock.granted`) is held 0.5–2.5 s, extended once half of the time (`lock.extend` with
//        its token), then released (`lock.release` with its token). `lock_held` is a normal
//        answer (a colleague holds the segment) and so is `wait_timeout`.
//   4. On `reconnect` (a draining node; it then closes with 1012) or any unexpected close, the
//      VU waits `after_ms`, reconnects to the NEXT node of the list with
//      `?resume=<resume_token>` and must get its session back (`welcome.resumed`). The
//      `room.snapshot` that follows must list every lock the VU held with the same token, and
//      a `lock.extend` with that token must succeed: otherwise the lock counts as lost. Locks in
//      the snapshot the VU did not know it held (the grant's reply was lost in the move) are
//      adopted and released later. Waits do not survive a move (documented): they are dropped.
//   5. At the end it cancels its waits, releases every lock, leaves the room and closes with
//      1000, so a run leaves no lock behind and no `lock_disconnected` in the audit trail.
//
// Metrics (prefix `studio_`, so none clashes with k6's own `ws_*`):
//   studio_lock_acquire_ms      lock.acquire sent → its first answer (reply, or lock_held), tag
//                               outcome=granted|denied|queued
//   studio_lock_wait_ms         queued → lock.granted
//   studio_presence_ms          own presence sent → own presence.update received
//   studio_presence_fanout_ms   a member's presence sent → presence.update at another member
//   studio_cursor_fanout_ms     cursor sent → cursor frame at another member
//   studio_unexpected_errors    error frames other than lock_held / wait_timeout, closes other
//                               than a drain's, failed resumes, connections that never opened
//   studio_stray_denials        lock_held naming no request this VU waits on (logged, not failed)
//   studio_reconnects           successful resumes after a drain (or an unexpected close)
//   studio_locks_lost           locks held before a move and not ours after the resume
//   studio_locks_kept           locks checked after a resume (snapshot token + lock.extend)
//   studio_presence_leaves      presence.leave of another member before the scenario's end:
//                               nobody leaves before DURATION is up, so every one is a member
//                               who was merely moving (a drain, a roll) and was seen to go
//   studio_locks_lost also counts `lock.released {reason: "lost"}` of a lock the VU holds (its
//   node could not renew the lease in time: it lost Redis)
//   studio_lock_grants, studio_lock_denials, studio_wait_timeouts, studio_waits_dropped
// Latencies are Date.now() just before the send against the receive event's timestamp (taken
// when k6 read the frame, before the VU's JS handles it, so a busy VU does not inflate it): one
// clock (one k6 process), millisecond resolution at the send side.
//
// Thresholds (override with -e): studio_lock_acquire_ms p99 < P99_LOCK_MS (default 100) and
// median < P50_LOCK_MS (20); studio_presence_ms p99 < P99_PRESENCE_MS (100) and median <
// P50_PRESENCE_MS (20); studio_unexpected_errors == 0; studio_locks_lost == 0. A crossed
// threshold makes k6 exit with 99. Why these numbers: the contract's goal is presence "within
// milliseconds" for everyone in the room and a lock answer in a round trip or two to Redis;
// the closed-loop benchmark measures 3-4 ms p99 for both on two nodes (docs/benchmarks.md).
// Here k6's JavaScript shares the 2 cores with the nodes and Redis, so the defaults leave room
// for that; on separate load-generator hardware, tighten them with -e.

import { WebSocket } from 'k6/experimental/websockets';
import { Counter, Trend } from 'k6/metrics';
import exec from 'k6/execution';
import { userToken } from './lib/jwt.js';

// ---- configuration (environment) -------------------------------------------------------------

function envInt(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : parseInt(v, 10);
}
function envNum(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : parseFloat(v);
}

// "60s", "2m", "1m30s" or a number of seconds.
function seconds(s) {
  if (/^\d+(\.\d+)?$/.test(s)) return parseFloat(s);
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|h|m|s)/g;
  let m;
  while ((m = re.exec(s)) !== null) {
    const n = parseFloat(m[1]);
    total += m[2] === 'h' ? n * 3600 : m[2] === 'm' ? n * 60 : m[2] === 's' ? n : n / 1000;
  }
  if (total <= 0) throw new Error(`bad duration ${s}`);
  return total;
}

const URLS = (__ENV.LOCKSTEP_URLS || 'http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083')
  .split(',')
  .map((u) => u.trim().replace(/\/+$/, '').replace(/^http/, 'ws'))
  .filter((u) => u.length > 0);
const SECRET = __ENV.LOCKSTEP_JWT_SECRET || 'local-cluster-secret-change-me-0123456789';
const VUS = envInt('VUS', 50);
const DURATION_S = seconds(__ENV.DURATION || '30s');
const RAMP_S = envNum('RAMP_SECONDS', Math.min(5, DURATION_S / 6));
const SCENES = Math.max(1, envInt('SCENES', Math.ceil(VUS / 10)));
const SEGMENTS = envInt('SEGMENTS', 6);
const EDITOR_PERCENT = envInt('EDITOR_PERCENT', 30);
const CURSOR_HZ = envNum('CURSOR_HZ', 2);
const RUN = __ENV.RUN_ID || 'k6';
const LOG_ERRORS = envInt('LOG_ERRORS', 20); // console lines per VU for unexpected things

// ---- metrics ----------------------------------------------------------------------------------

const lockAcquire = new Trend('studio_lock_acquire_ms', true);
const lockWait = new Trend('studio_lock_wait_ms', true);
const presenceOwn = new Trend('studio_presence_ms', true);
const presenceFanout = new Trend('studio_presence_fanout_ms', true);
const cursorFanout = new Trend('studio_cursor_fanout_ms', true);
const unexpected = new Counter('studio_unexpected_errors');
// Denials (`lock_held`) naming a request id this VU is not waiting on. Seen about once in ten
// k6_roll runs after a move; not yet explained (a duplicate answer to an acquire?). A denial
// changes no lock, and lost locks and overlaps are checked on their own, so it is counted and
// logged here, not failed on, until it is understood (issue 10's closing note).
const strayDenials = new Counter('studio_stray_denials');
const reconnects = new Counter('studio_reconnects');
const locksLost = new Counter('studio_locks_lost');
const locksKept = new Counter('studio_locks_kept');
const presenceLeaves = new Counter('studio_presence_leaves');
const grants = new Counter('studio_lock_grants');
const denials = new Counter('studio_lock_denials');
const waitTimeouts = new Counter('studio_wait_timeouts');
const waitsDropped = new Counter('studio_waits_dropped');

export const options = {
  scenarios: {
    studio: {
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      // The session ends by itself at DURATION; the margin covers the ramp and the goodbyes.
      maxDuration: `${Math.ceil(DURATION_S + RAMP_S + 30)}s`,
      gracefulStop: '10s',
    },
  },
  thresholds: {
    studio_lock_acquire_ms: [`p(99)<${envNum('P99_LOCK_MS', 100)}`, `med<${envNum('P50_LOCK_MS', 20)}`],
    studio_presence_ms: [`p(99)<${envNum('P99_PRESENCE_MS', 100)}`, `med<${envNum('P50_PRESENCE_MS', 20)}`],
    studio_unexpected_errors: ['count==0'],
    studio_locks_lost: ['count==0'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max'],
};

// ---- helpers ----------------------------------------------------------------------------------

function rand(min, max) {
  return min + Math.random() * (max - min);
}
function pick(xs) {
  return xs[Math.floor(Math.random() * xs.length)];
}

// ---- one VU's session -------------------------------------------------------------------------

export default function () {
  const vu = exec.vu.idInTest;
  const editor = (vu - 1) % 100 < EDITOR_PERCENT;
  const user = `${RUN}-u${vu}`;
  const scene = `scene:${RUN}-${(vu - 1) % SCENES}`;
  const segments = [];
  for (let i = 0; i < SEGMENTS; i++) segments.push(`segment:${RUN}-${(vu - 1) % SCENES}-${i}`);
  const token = userToken(SECRET, user, `K6 user ${vu}`, { 'scene:*': editor ? 'editor' : 'viewer' });
  const endAt = exec.scenario.startTime + DURATION_S * 1000;

  // Zero samples, so the count thresholds always have data to judge.
  unexpected.add(0);
  locksLost.add(0);
  reconnects.add(0);
  presenceLeaves.add(0);

  let nodeIndex = (vu - 1) % URLS.length;
  let ws = null;
  let sessionId = null;
  let resumeToken = null;
  let nextId = 1;
  let logged = 0;
  // 'connecting' | 'open' | 'moving' (reconnect announced) | 'ending' | 'done'
  let phase = 'connecting';
  let connectFailures = 0;
  let ticker = null;

  const pending = new Map(); // request id -> {kind, resource, sentAt, wait}
  // Requests sent before a move. Their answers may still arrive on the new connection (a
  // resumed session keeps its queued frames); the snapshot, not those answers, is the truth.
  const orphaned = new Set();
  const held = new Map(); // resource -> {token, releaseAt, extended, releasing}
  const waiting = new Map(); // resource -> {id, queuedAt}
  let mustKeep = null; // Map resource -> token, while a resume is being checked
  let presenceSeq = 0;
  const presenceSent = new Map(); // seq -> sent at
  let nextCursorAt = 0;
  let nextPresenceAt = 0;
  let nextLockAt = 0;
  let endingSince = 0;
  let moveDelay = 0; // after_ms of the last reconnect notice
  let leaving = false; // the final `leave` was sent

  function note(what) {
    if (logged < LOG_ERRORS) {
      logged++;
      console.warn(`vu ${vu} (${user}, node ${URLS[nodeIndex]}): ${what}`);
    }
  }
  function oops(what) {
    unexpected.add(1);
    note(`unexpected: ${what}`);
  }

  function send(msg) {
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(msg));
    return true;
  }
  function request(msg, meta) {
    const id = nextId++;
    msg.id = id;
    // The clock is read before the send: the reply's receive timestamp is taken on another
    // goroutine, which may run while this VU's JS is descheduled right after the send.
    const sentAt = Date.now();
    if (!send(msg)) return null;
    pending.set(id, Object.assign({ sentAt }, meta));
    return id;
  }

  function connect() {
    phase = 'connecting';
    let url = `${URLS[nodeIndex]}/v1/ws?token=${token}`;
    if (resumeToken) url += `&resume=${resumeToken}`;
    const sock = new WebSocket(url, ['lockstep.v1.json']);
    ws = sock;
    let welcomed = false;
    sock.onmessage = (e) => {
      if (sock !== ws) return;
      let m;
      try {
        m = JSON.parse(e.data);
      } catch (_) {
        oops(`unparsable frame ${String(e.data).slice(0, 80)}`);
        return;
      }
      const at = e.timestamp || Date.now();
      if (m.type === 'welcome') welcomed = true;
      onMessage(m, at);
    };
    sock.onerror = (e) => {
      if (sock !== ws) return;
      if (!welcomed && phase === 'connecting') note(`connect error ${e.error || ''}`);
    };
    sock.onclose = () => {
      if (sock !== ws) return;
      onClose(welcomed);
    };
  }

  function onClose(welcomed) {
    ws = null;
    if (phase === 'done') {
      finish();
      return;
    }
    if (!welcomed) {
      // The upgrade failed (a draining node answers 503) or the node is gone: try the next.
      connectFailures++;
      if (connectFailures > 3 * URLS.length) {
        oops(`could not (re)connect after ${connectFailures} attempts`);
        finish();
        return;
      }
      nodeIndex = (nodeIndex + 1) % URLS.length;
      setTimeout(connect, 200);
      return;
    }
    // Also while ending: the session moves, and the goodbyes start again on the new node.
    if (phase !== 'moving') {
      oops('connection closed without a reconnect notice');
      startMove(0);
    } else {
      startMove(moveDelay);
    }
  }

  // Leaves this node: remembers the locks that must survive, then resumes on the next node.
  function startMove(afterMs) {
    if (mustKeep === null) {
      mustKeep = new Map();
      // A lock whose release is in flight may be gone or not: the snapshot tells.
      for (const [res, h] of held) if (!h.releasing) mustKeep.set(res, h.token);
    }
    for (const [res, w] of waiting) {
      waitsDropped.add(1);
      pending.delete(w.id);
      waiting.delete(res);
    }
    // Answers to these may or may not come on the new connection (the session keeps what was
    // queued for it); the snapshot tells what happened, so such answers are only recognised.
    for (const id of pending.keys()) orphaned.add(id);
    pending.clear();
    nodeIndex = (nodeIndex + 1) % URLS.length;
    setTimeout(connect, afterMs);
  }

  function onMessage(m, at) {
    switch (m.type) {
      case 'welcome':
        sessionId = m.session_id;
        resumeToken = m.resume_token;
        connectFailures = 0;
        phase = 'open';
        if (mustKeep !== null) {
          if (!m.resumed) {
            oops('resume refused: a new session');
            locksLost.add(mustKeep.size);
            mustKeep = null;
            held.clear();
            request({ type: 'join', room: scene }, { kind: 'join' });
          }
          // Resumed: the room.snapshot that follows carries our locks.
        } else {
          request({ type: 'join', room: scene }, { kind: 'join' });
        }
        return;
      case 'room.snapshot':
        onSnapshot(m);
        return;
      case 'reply':
        onReply(m, at);
        return;
      case 'error':
        onError(m, at);
        return;
      case 'lock.granted': {
        const p = pending.get(m.id);
        if (p) pending.delete(m.id);
        const w = waiting.get(m.resource);
        if (w) {
          lockWait.add(at - w.queuedAt);
          waiting.delete(m.resource);
        }
        grants.add(1, { via: 'queue' });
        hold(m.resource, m.token);
        return;
      }
      case 'presence.update': {
        const mem = m.member || {};
        const st = mem.state || {};
        if (mem.session_id === sessionId) {
          const sent = presenceSent.get(st.seq);
          if (sent !== undefined) {
            presenceOwn.add(at - sent);
            presenceSent.delete(st.seq);
          }
        } else if (typeof st.t === 'number') {
          presenceFanout.add(at - st.t);
        }
        return;
      }
      case 'cursor': {
        const sel = m.selection;
        if (sel && typeof sel.t === 'number' && m.session_id !== sessionId) cursorFanout.add(at - sel.t);
        return;
      }
      case 'reconnect':
        phase = 'moving';
        // The node closes with 1012 next; onClose then resumes after after_ms.
        moveDelay = m.after_ms || 0;
        return;
      case 'presence.leave': {
        // Before the end nobody leaves for good: a leave is a member whose move was seen.
        const mem = m.member || {};
        if (at < endAt && mem.session_id !== sessionId) {
          presenceLeaves.add(1);
          note(`presence.leave of ${mem.user_id} (session ${mem.session_id}) before the end`);
        }
        return;
      }
      case 'lock.released': {
        const h = held.get(m.resource);
        if (m.reason === 'lost' && h && !h.releasing) {
          locksLost.add(1);
          oops(`lock on ${m.resource} (token ${h.token}) lost: its node could not renew the lease`);
          held.delete(m.resource);
        }
        return;
      }
      case 'presence.join':
      case 'lock.acquired':
      case 'broadcast':
      case 'pong':
        return;
      default:
        oops(`unknown message type ${m.type}`);
    }
  }

  // After a resume the snapshot is the truth about our locks. (Other snapshots — after a join,
  // after a resync — are not used: one built before a reply we already saw would mislead.)
  function onSnapshot(m) {
    if (m.room !== scene || mustKeep === null) return;
    const ours = new Map();
    for (const l of m.locks || []) {
      if (l.token !== undefined && l.token !== null) ours.set(l.resource, l.token);
    }
    for (const [res, tok] of mustKeep) {
      if (ours.get(res) === tok) {
        // Ours by the snapshot; lock.extend with the token proves it to the lock store.
        request({ type: 'lock.extend', room: scene, resource: res, token: tok, ttl_ms: 30000 }, { kind: 'verify', resource: res });
      } else {
        locksLost.add(1);
        oops(`lock on ${res} (token ${tok}) lost in the move: snapshot has ${ours.get(res)}`);
        held.delete(res);
      }
    }
    reconnects.add(1);
    mustKeep = null;
    // Grants whose reply was lost in the move: adopt them (released later). A release lost
    // in the move is sent again.
    for (const [res, tok] of ours) {
      const h = held.get(res);
      if (!h || h.releasing) hold(res, tok);
    }
    // Held locks the snapshot does not list had their release done before the move.
    for (const res of Array.from(held.keys())) if (!ours.has(res)) held.delete(res);
  }

  function onReply(m, at) {
    const p = pending.get(m.id);
    if (!p) return;
    pending.delete(m.id);
    switch (p.kind) {
      case 'acquire':
        lockAcquire.add(at - p.sentAt, { outcome: 'granted' });
        grants.add(1, { via: 'request' });
        hold(p.resource, m.token);
        return;
      case 'verify':
        locksKept.add(1);
        return;
      case 'release':
        held.delete(p.resource);
        return;
      default:
        return;
    }
  }

  function onError(m, at) {
    const p = m.id !== undefined ? pending.get(m.id) : undefined;
    if (m.code === 'lock_held' && p && p.kind === 'acquire') {
      if (p.wait && m.queue_position !== undefined) {
        // Stays pending: lock.granted or wait_timeout answers it later with the same id.
        lockAcquire.add(at - p.sentAt, { outcome: 'queued' });
        if (phase === 'ending') {
          pending.delete(m.id);
          request({ type: 'lock.cancel_wait', room: scene, resource: p.resource }, { kind: 'cancel', resource: p.resource });
        } else {
          waiting.set(p.resource, { id: m.id, queuedAt: at });
        }
      } else {
        pending.delete(m.id);
        lockAcquire.add(at - p.sentAt, { outcome: 'denied' });
        denials.add(1);
      }
      return;
    }
    if (m.code === 'wait_timeout') {
      if (p) pending.delete(m.id);
      waiting.delete(m.resource);
      waitTimeouts.add(1);
      return;
    }
    if (p) pending.delete(m.id);
    if (p && p.kind === 'cancel' && m.code === 'not_found') {
      // The wait was answered first: its lock.granted is on the way and gets released.
      return;
    }
    if (!p && m.id !== undefined && orphaned.delete(m.id)) {
      // Answer to a request sent before a move (a denial, a wait that timed out, a release
      // the snapshot already settled): nothing to do.
      return;
    }
    if (!p && m.code === 'lock_held') {
      strayDenials.add(1);
      note(`stray lock_held for request ${m.id} on ${m.resource} (not pending, not from before a move)`);
      return;
    }
    if (p && p.kind === 'verify') {
      locksLost.add(1);
      held.delete(p.resource);
      oops(`lock on ${p.resource} not ours after the resume: ${m.code} ${m.message}`);
      return;
    }
    oops(`error ${m.code}: ${m.message} (request ${p ? p.kind : 'none'})`);
    if (p && (p.kind === 'release' || p.kind === 'extend')) held.delete(p.resource);
  }

  function hold(resource, tok) {
    if (phase === 'ending') {
      // A wait answered after we started to leave: give it straight back.
      held.set(resource, { token: tok, releaseAt: 0, extended: true, releasing: true });
      request({ type: 'lock.release', room: scene, resource, token: tok }, { kind: 'release', resource });
      return;
    }
    held.set(resource, {
      token: tok,
      releaseAt: Date.now() + rand(500, 2500),
      extended: Math.random() < 0.5,
      releasing: false,
    });
  }

  function tick() {
    const now = Date.now();
    // After a resume nothing is sent until its room.snapshot has been checked: a release sent
    // between `welcome` and the snapshot would be applied after the snapshot was built, and
    // the lock.extend that verifies the snapshot would then find the lock gone (k6_roll saw
    // it once the gateway answered faster).
    if (mustKeep !== null) return;
    if (phase === 'ending') {
      // Waits cancelled and locks released first; then leave; then close.
      if (pending.size === 0 && !leaving) {
        leaving = true;
        request({ type: 'leave', room: scene }, { kind: 'leave' });
      } else if ((pending.size === 0 && leaving) || now - endingSince > 5000) {
        if (pending.size > 0) oops(`${pending.size} requests unanswered at the end`);
        phase = 'done';
        if (ws) ws.close(1000);
        else finish();
      }
      return;
    }
    if (phase !== 'open') return;
    if (now >= endAt) {
      startEnding();
      return;
    }
    if (now >= nextCursorAt) {
      nextCursorAt = now + 1000 / CURSOR_HZ;
      send({ type: 'cursor', room: scene, x: Math.round(rand(0, 1920)), y: Math.round(rand(0, 1080)), selection: { t: now } });
    }
    if (now >= nextPresenceAt) {
      nextPresenceAt = now + rand(1500, 4500);
      presenceSeq++;
      presenceSent.set(presenceSeq, now);
      send({ type: 'presence', room: scene, focus: pick(segments), state: { seq: presenceSeq, t: now } });
      // Updates lost in a move are forgotten.
      if (presenceSent.size > 20) presenceSent.delete(presenceSeq - 20);
    }
    if (editor) {
      for (const [res, h] of held) {
        if (h.releaseAt === 0 || now < h.releaseAt) continue;
        if (!h.extended) {
          h.extended = true;
          h.releaseAt = now + rand(200, 1000);
          request({ type: 'lock.extend', room: scene, resource: res, token: h.token, ttl_ms: 30000 }, { kind: 'extend', resource: res });
        } else {
          h.releaseAt = 0;
          h.releasing = true;
          request({ type: 'lock.release', resource: res, token: h.token }, { kind: 'release', resource: res });
        }
      }
      if (held.size === 0 && waiting.size === 0 && pending.size === 0 && now >= nextLockAt) {
        nextLockAt = now + rand(1000, 3000);
        const wait = Math.random() < 1 / 3;
        const msg = { type: 'lock.acquire', room: scene, resource: pick(segments), action: pick(['approve', 'trim', 'regenerate']), ttl_ms: 30000 };
        if (wait) {
          msg.wait = true;
          msg.wait_timeout_ms = 8000;
        }
        request(msg, { kind: 'acquire', resource: msg.resource, wait });
      }
    }
  }

  function startEnding() {
    phase = 'ending';
    leaving = false;
    endingSince = Date.now();
    for (const [res, w] of waiting) {
      pending.delete(w.id);
      request({ type: 'lock.cancel_wait', resource: res }, { kind: 'cancel', resource: res });
    }
    waiting.clear();
    for (const [res, h] of held) {
      // A release already in flight gets its own answer; a second one would be refused
      // (lock_not_held) and counted as an unexpected error.
      if (h.releasing) continue;
      h.releasing = true;
      request({ type: 'lock.release', resource: res, token: h.token }, { kind: 'release', resource: res });
    }
  }

  function finish() {
    phase = 'done';
    if (ticker !== null) {
      clearInterval(ticker);
      ticker = null;
    }
  }

  setTimeout(() => {
    connect();
    ticker = setInterval(tick, 100);
  }, rand(0, RAMP_S * 1000));
}
