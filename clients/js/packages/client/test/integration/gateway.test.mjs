// @lockstep/client against the real gateway binary: presence, lock race, waits, resume after a
// dropped socket, token refresh, MessagePack, and a SIGTERM drain moving a client to another
// node with its locks.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { encode, decode } from "@msgpack/msgpack";
import { nextEvent, until } from "../fake-server.mjs";
import { client, devToken, mintToken, SECRET, startGateway, startRedis, tcpProxy, trackingWebSocket } from "./gateway.mjs";

let gw;
const clients = [];
before(async () => {
  gw = await startGateway();
});
after(async () => {
  for (const c of clients) c.close();
  await gw?.stop();
});

function devClient(sub, opts = {}) {
  const c = client(gw.url, () => devToken(gw.url, sub, `${sub[0].toUpperCase()}${sub.slice(1)}`), opts);
  clients.push(c);
  return c;
}

test("two clients see each other", async () => {
  const a = devClient("alice");
  const b = devClient("bob");
  await Promise.all([a.connect(), b.connect()]);
  const ra = a.room("scene:see");
  const rb = b.room("scene:see");
  await ra.join({ state: { tool: "pen" }, focus: "segment:1" });
  await rb.join();
  await until(() => ra.members.length === 2, 5_000, "alice sees bob");
  assert.deepEqual(rb.others.map((m) => m.name), ["Alice"]);
  assert.deepEqual(rb.others[0].state, { tool: "pen" });
  assert.equal(rb.others[0].focus, "segment:1");
  assert.equal(ra.others[0].userId, "bob");
  const got = nextEvent(rb, "broadcast");
  await ra.broadcast("chat", { text: "hi" });
  assert.deepEqual((await got).data, { text: "hi" });
  const cur = nextEvent(rb, "cursor");
  ra.moveCursor({ x: 10, y: 20 });
  const c = await cur;
  assert.deepEqual([c.userId, c.x, c.y], ["alice", 10, 20]);
  await rb.leave();
  await until(() => ra.members.length === 1, 5_000, "bob's leave");
});

test("exactly one wins a lock race; the loser gets lock_held naming the holder; a queued wait is granted on release", async () => {
  const a = devClient("ann");
  const b = devClient("ben");
  await Promise.all([a.connect(), b.connect()]);
  const [ra, rb] = [a.room("scene:race"), b.room("scene:race")];
  await Promise.all([ra.join(), rb.join()]);
  const results = await Promise.allSettled([
    ra.locks.acquire("segment:9", { action: "approve", ttlMs: 60_000 }),
    rb.locks.acquire("segment:9", { action: "trim", ttlMs: 60_000 }),
  ]);
  const won = results.filter((r) => r.status === "fulfilled");
  const lost = results.filter((r) => r.status === "rejected");
  assert.equal(won.length, 1, "exactly one winner");
  assert.equal(lost.length, 1);
  const winnerName = results[0].status === "fulfilled" ? "Ann" : "Ben";
  assert.equal(lost[0].reason.code, "lock_held");
  assert.equal(lost[0].reason.holder.name, winnerName);
  assert.ok(lost[0].reason.estimatedWaitMs >= 0);
  const lock = won[0].value;
  assert.equal(typeof lock.token, "number");
  const [winnerRoom, loserRoom] = winnerName === "Ann" ? [ra, rb] : [rb, ra];
  await until(() => loserRoom.locks.get("segment:9")?.holder.name === winnerName, 5_000, "the loser's list");
  assert.equal(winnerRoom.locks.get("segment:9").mine, true);

  const queued = [];
  const waiting = loserRoom.locks.acquire("segment:9", { action: "trim", wait: true, onQueued: (q) => queued.push(q) });
  await until(() => queued.length === 1, 5_000, "queued");
  assert.equal(queued[0].queuePosition, 1);
  assert.equal(queued[0].holder.name, winnerName);
  await lock.release();
  const next = await waiting;
  assert.equal(next.state, "held");
  assert.ok(next.token > lock.token, "fencing tokens increase");
  await until(() => winnerRoom.locks.get("segment:9")?.holder.name !== winnerName, 5_000, "the hand-off is seen");
  await next.release();
});

test("aborting a real wait cancels it on the server", async () => {
  const a = devClient("amy");
  const b = devClient("bill");
  await Promise.all([a.connect(), b.connect()]);
  const [ra, rb] = [a.room("scene:abort"), b.room("scene:abort")];
  await Promise.all([ra.join(), rb.join()]);
  const held = await ra.locks.acquire("segment:1", { action: "trim" });
  const ac = new AbortController();
  const queued = [];
  const w = rb.locks.acquire("segment:1", { action: "trim", wait: true, signal: ac.signal, onQueued: (q) => queued.push(q) });
  await until(() => queued.length === 1, 5_000, "queued");
  ac.abort();
  await assert.rejects(w, (e) => e.code === "aborted");
  await held.release();
  // The wait is gone: nobody was handed the lock, so a third acquire by amy wins at once.
  await until(() => ra.locks.list.length === 0, 5_000, "released");
  const again = await ra.locks.acquire("segment:1", { action: "trim" });
  await again.release();
});

test("a dropped socket resumes with its locks, and the peer never sees a leave", async () => {
  const { WebSocket, sockets } = trackingWebSocket();
  const a = devClient("ada", { WebSocket });
  const b = devClient("bo");
  await Promise.all([a.connect(), b.connect()]);
  const [ra, rb] = [a.room("scene:drop"), b.room("scene:drop")];
  await ra.join({ state: { n: 1 } });
  await rb.join();
  const lock = await ra.locks.acquire("segment:4", { action: "approve", ttlMs: 120_000 });
  const sessionId = a.session.sessionId;
  await until(() => rb.locks.get("segment:4"), 5_000, "the peer sees the lock");
  const peerEvents = [];
  rb.on("presence", (e) => peerEvents.push(`${e.type}:${e.member.userId}`));
  rb.locks.on("change", (l) => peerEvents.push(`locks:${l.length}`));
  const lockEvents = [];
  lock.on("lost", (r) => lockEvents.push(r));
  const statuses = [];
  a.on("status", (s) => statuses.push(s));
  const membersBefore = ra.members;

  sockets.at(-1).terminate(); // the TCP connection dies, no close frame
  await until(() => statuses.includes("reconnecting"), 5_000, "reconnecting");
  await until(() => a.status === "connected", 10_000, "resumed");
  assert.equal(a.session.sessionId, sessionId, "same session");
  assert.equal(ra.members, membersBefore, "the resume snapshot changed nothing");
  assert.deepEqual(peerEvents, [], "the peer saw no leave, join or lock change");
  // After the resume the client still holds the lock, with the same token.
  const again = await ra.locks.acquire("segment:4", { action: "approve" });
  assert.equal(again.token, lock.token);
  await lock.extend(60_000);
  assert.equal(lock.state, "held");
  assert.deepEqual(lockEvents, []);
  assert.deepEqual(peerEvents.filter((e) => !e.startsWith("locks")), [], "the peer saw no leave or join");
  assert.equal(rb.locks.get("segment:4").holder.userId, "ada");
  await lock.release();
});

test("a silent network path is noticed by the ping and the session taken over by the resume", async () => {
  const lb = await tcpProxy(gw.port);
  try {
    const a = client(lb.url, () => devToken(gw.url, "sid"), { pingIntervalMs: 200, pongTimeoutMs: 400 });
    const b = devClient("sam");
    clients.push(a);
    await Promise.all([a.connect(), b.connect()]);
    const [ra, rb] = [a.room("scene:silent"), b.room("scene:silent")];
    await ra.join();
    await rb.join();
    const lock = await ra.locks.acquire("segment:2", { action: "trim", ttlMs: 120_000 });
    await until(() => rb.locks.get("segment:2"), 5_000, "the peer sees the lock");
    const sessionId = a.session.sessionId;
    const peer = [];
    rb.on("presence", (e) => peer.push(`${e.type}:${e.member.userId}`));
    const closed = nextEvent(a, "closed", 10_000);
    lb.freeze();
    assert.equal((await closed).code, 4000, "dead socket detected by the app-level ping");
    await until(() => a.status === "connected", 10_000, "resumed");
    assert.equal(a.session.sessionId, sessionId, "the old, silent socket was taken over");
    assert.equal(lock.state, "held");
    await lock.extend(60_000);
    assert.deepEqual(peer, [], "the peer saw no leave or join");
    await lock.release();
  } finally {
    await lb.close();
  }
});

test("MessagePack end to end, with a JSON peer", async () => {
  const a = devClient("mia", { encoding: "msgpack" });
  const b = devClient("max", { encoding: "msgpack", msgpack: { encode, decode } });
  const c = devClient("jo");
  await Promise.all([a.connect(), b.connect(), c.connect()]);
  const [ra, rb, rc] = [a.room("scene:mp"), b.room("scene:mp"), c.room("scene:mp")];
  await ra.join({ state: { deep: { list: [1, 2.5, "x"] } } });
  await rb.join();
  await rc.join();
  await until(() => rc.members.length === 3 && ra.members.length === 3, 5_000, "three members");
  assert.deepEqual(rc.others.find((m) => m.userId === "mia").state, { deep: { list: [1, 2.5, "x"] } });
  const lock = await ra.locks.acquire("segment:1", { action: "trim" });
  assert.equal(typeof lock.token, "number", "u64 tokens decode as numbers");
  assert.ok(Number.isSafeInteger(lock.token));
  assert.equal(typeof lock.expiresAt, "number");
  await until(() => rc.locks.get("segment:1") && rb.locks.get("segment:1"), 5_000, "both peers see the lock");
  assert.equal(rb.locks.get("segment:1").expiresAt, rc.locks.get("segment:1").expiresAt);
  const denied = await rb.locks.acquire("segment:1", { action: "trim" }).catch((e) => e);
  assert.equal(denied.code, "lock_held");
  assert.equal(denied.holder.name, "Mia");
  const got = nextEvent(rc, "broadcast");
  await rb.broadcast("note", { t: "from msgpack" });
  assert.deepEqual((await got).data, { t: "from msgpack" });
  const cur = nextEvent(ra, "cursor");
  rc.moveCursor({ x: 1.5, y: 2 });
  assert.equal((await cur).x, 1.5);
  await lock.release();
});

test("an expiring token is refreshed through getToken (auth.expiring → auth.refresh), and a refused one through 4001", async () => {
  const node = await startGateway({ LOCKSTEP_JWT_SECRET: SECRET });
  try {
    // The first token lives 4 s: the server warns at half its life and ends the session at
    // `exp` unless refreshed.
    const first = mintToken("eve", { ttlS: 4 });
    const expiresAt = Date.now() + 4_000;
    let calls = 0;
    const c = client(node.url, () => (++calls === 1 ? first : mintToken("eve")));
    clients.push(c);
    const closed = [];
    c.on("closed", (e) => closed.push(e.code));
    await c.connect();
    const sessionId = c.session.sessionId;
    await c.room("scene:tok").join();
    await until(() => calls >= 2, 10_000, "getToken called on auth.expiring");
    await until(() => Date.now() > expiresAt + 2_000, 15_000, "past the first token's exp");
    assert.equal(c.status, "connected");
    assert.equal(c.session.sessionId, sessionId, "the session outlived its first token");
    assert.deepEqual(closed, []);
    await c.room("scene:tok").updatePresence({ focus: "segment:1" });

    // A token that is already expired at connect: 4001, getToken, connected.
    let calls2 = 0;
    const d = client(node.url, () => (++calls2 === 1 ? mintToken("fay", { ttlS: -60 }) : mintToken("fay")));
    clients.push(d);
    const codes = [];
    d.on("closed", (e) => codes.push(e.code));
    await d.connect();
    assert.deepEqual(codes, [4001]);
    assert.equal(calls2, 2);
  } finally {
    await node.stop();
  }
});

test("a SIGTERM drain moves a client to a second node with its locks", async () => {
  const redis = await startRedis();
  const common = { LOCKSTEP_REDIS_URL: redis.url, LOCKSTEP_JWT_SECRET: SECRET, LOCKSTEP_DRAIN_TIMEOUT: "3s", LOCKSTEP_LOCK_LEASE: "2s" };
  const n1 = await startGateway({ ...common, LOCKSTEP_NODE_ID: "js-n1" });
  const n2 = await startGateway({ ...common, LOCKSTEP_NODE_ID: "js-n2" });
  const lb = await tcpProxy(n1.port);
  try {
    const a = client(lb.url, () => mintToken("dora"));
    const b = client(n2.url, () => mintToken("finn"));
    clients.push(a, b);
    await Promise.all([a.connect(), b.connect()]);
    assert.equal(a.session.nodeId, "js-n1");
    const [ra, rb] = [a.room("scene:drain"), b.room("scene:drain")];
    await ra.join();
    await rb.join();
    await until(() => rb.members.length === 2, 5_000, "finn sees dora across nodes");
    const lock = await ra.locks.acquire("segment:1", { action: "approve", ttlMs: 120_000 });
    await until(() => rb.locks.get("segment:1"), 5_000, "finn sees the lock");
    const sessionId = a.session.sessionId;
    const peer = [];
    rb.on("presence", (e) => peer.push(`${e.type}:${e.member.userId}`));
    const lost = [];
    lock.on("lost", (r) => lost.push(r));
    const closed = nextEvent(a, "closed", 10_000);

    lb.state.target = n2.port; // the load balancer stops sending traffic to the draining node
    const exit = n1.terminate();
    assert.equal((await closed).code, 1012);
    await until(() => a.status === "connected" && a.session?.nodeId === "js-n2", 15_000, "moved to js-n2");
    assert.equal(a.session.sessionId, sessionId, "resumed, not a new session");
    assert.ok((await exit).code === 0 || (await exit).signal === null, "n1 drained and exited");
    assert.equal(lock.state, "held");
    assert.deepEqual(lost, []);
    await lock.extend(60_000);
    const denied = await rb.locks.acquire("segment:1", { action: "trim" }).catch((e) => e);
    assert.equal(denied.code, "lock_held");
    assert.equal(denied.holder.userId, "dora");
    assert.deepEqual(peer.filter((e) => e.startsWith("leave")), [], "finn never saw dora leave");
    await lock.release();
  } finally {
    await lb.close();
    await n1.stop();
    await n2.stop();
    await redis.stop();
  }
});

test("the browser bundle is self-contained and works (here with ws)", async () => {
  const bundle = await import("../../dist/lockstep.browser.js");
  const { default: WebSocket } = await import("ws");
  const c = new bundle.Lockstep({ url: gw.url, getToken: () => devToken(gw.url, "bea"), WebSocket });
  clients.push(c);
  await c.connect();
  const room = c.room("scene:bundle");
  await room.join({ state: { ok: true } });
  assert.equal(room.self.userId, "bea");
  const lock = await room.locks.acquire("segment:1", { action: "trim" });
  await lock.release();
  c.close();
  // No bare import in the bundle: MessagePack needs the `msgpack` option there.
  const m = new bundle.Lockstep({ url: gw.url, getToken: () => devToken(gw.url, "bea"), WebSocket, encoding: "msgpack" });
  await assert.rejects(m.connect(), (e) => e instanceof bundle.LockstepError && e.code === "bad_options");
});
