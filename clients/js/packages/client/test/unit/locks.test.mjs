// Locks: grants, denials, waits (queued, re-asked after reconnect, aborted), lost reasons,
// extend/release, the lock list, late grants given back.
import assert from "node:assert/strict";
import { test } from "node:test";
import { member, nextEvent, sleep, until } from "../fake-server.mjs";
import { connected, joined } from "../helpers.mjs";

const holder = (user, session) => ({ user_id: user, session_id: session, name: user.toUpperCase(), action: "trim", since: 1, expires_at: Date.now() + 60_000 });

async function setupRoom(opts) {
  const env = await connected(opts);
  const room = await joined(env.client, env.conn, "scene:1", [member("alice", "s1"), member("bob", "s2")]);
  return { ...env, room };
}

async function grant(conn, room, resource = "segment:1", token = 11) {
  const p = room.locks.acquire(resource, { action: "trim", ttlMs: 60_000 });
  const a = await conn.next("lock.acquire");
  assert.deepEqual([a.room, a.resource, a.action, a.ttl_ms], ["scene:1", resource, "trim", 60_000]);
  conn.send({ type: "lock.acquired", room: "scene:1", resource, action: "trim", expires_at: Date.now() + 60_000, holder: holder("alice", "s1") });
  conn.send({ type: "reply", id: a.id, room: "scene:1", resource, token, expires_at: Date.now() + 60_000 });
  return p;
}

test("acquire resolves a held Lock; the list marks it mine; release ends it without `lost`", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const lock = await grant(conn, room);
  assert.equal(lock.token, 11);
  assert.equal(lock.state, "held");
  assert.equal(room.locks.get("segment:1").mine, true);
  assert.deepEqual(room.locks.held, [lock]);
  let lost = 0;
  lock.on("lost", () => lost++);
  const rp = lock.release();
  const r = await conn.next("lock.release");
  assert.equal(r.token, 11);
  conn.send({ type: "lock.released", room: "scene:1", resource: "segment:1", reason: "released" });
  conn.send({ type: "reply", id: r.id, room: "scene:1", resource: "segment:1" });
  await rp;
  assert.equal(lock.state, "released");
  assert.equal(lost, 0);
  assert.equal(room.locks.list.length, 0);
  assert.deepEqual(room.locks.held, []);
  await cleanup();
});

test("denied: lock_held with the holder's name and estimated wait", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const p = room.locks.acquire("segment:1", { action: "approve" });
  const a = await conn.next("lock.acquire");
  conn.send({ type: "error", id: a.id, code: "lock_held", message: "held", resource: "segment:1", holder: holder("bob", "s2"), estimated_wait_ms: 1234 });
  await assert.rejects(p, (e) => e.code === "lock_held" && e.holder.name === "BOB" && e.estimatedWaitMs === 1234 && e.resource === "segment:1");
  await cleanup();
});

test("a queued wait stays pending past the request timeout, is re-asked after reconnect, resolves on lock.granted", async () => {
  const { server, client, conn, room, cleanup } = await setupRoom({ requestTimeoutMs: 1_000 });
  const queued = [];
  const p = room.locks.acquire("segment:1", { action: "trim", wait: true, onQueued: (q) => queued.push(q) });
  const a = await conn.next("lock.acquire");
  assert.equal(a.wait, true);
  conn.send({ type: "error", id: a.id, code: "lock_held", message: "held", resource: "segment:1", holder: holder("bob", "s2"), estimated_wait_ms: 500, queue_position: 1 });
  await until(() => queued.length === 1);
  assert.equal(queued[0].holder.userId, "bob");
  await sleep(1_200); // past requestTimeoutMs: still pending
  conn.terminate();
  const c2 = await server.nextConnection();
  c2.welcome({ resumed: true, resume_token: "r2" });
  const again = await c2.next("lock.acquire");
  assert.equal(again.resource, "segment:1");
  assert.equal(again.wait, true);
  c2.send({ type: "error", id: again.id, code: "lock_held", message: "held", resource: "segment:1", holder: holder("bob", "s2"), estimated_wait_ms: 500, queue_position: 1 });
  await until(() => queued.length === 2);
  c2.send({ type: "lock.granted", id: again.id, room: "scene:1", resource: "segment:1", token: 12, expires_at: Date.now() + 60_000 });
  const lock = await p;
  assert.equal(lock.token, 12);
  assert.equal(client.status, "connected");
  await cleanup();
});

test("wait_timeout rejects the wait", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const p = room.locks.acquire("segment:1", { action: "trim", wait: true, waitTimeoutMs: 100 });
  const a = await conn.next("lock.acquire");
  assert.equal(a.wait_timeout_ms, 100);
  conn.send({ type: "error", id: a.id, code: "lock_held", message: "held", resource: "segment:1", holder: holder("bob", "s2"), estimated_wait_ms: 1, queue_position: 2 });
  conn.send({ type: "error", id: a.id, code: "wait_timeout", message: "timed out", resource: "segment:1" });
  await assert.rejects(p, (e) => e.code === "wait_timeout");
  await cleanup();
});

test("aborting a queued wait rejects `aborted` and sends lock.cancel_wait; a grant that raced it is given back", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const ac = new AbortController();
  const p = room.locks.acquire("segment:1", { action: "trim", wait: true, signal: ac.signal });
  const a = await conn.next("lock.acquire");
  conn.send({ type: "error", id: a.id, code: "lock_held", message: "held", resource: "segment:1", holder: holder("bob", "s2"), estimated_wait_ms: 1, queue_position: 1 });
  await sleep(20);
  ac.abort();
  await assert.rejects(p, (e) => e.code === "aborted");
  const c = await conn.next("lock.cancel_wait");
  assert.deepEqual([c.room, c.resource], ["scene:1", "segment:1"]);
  conn.send({ type: "lock.granted", id: a.id, room: "scene:1", resource: "segment:1", token: 99, expires_at: Date.now() + 1000 });
  const r = await conn.next("lock.release");
  assert.equal(r.token, 99);
  await cleanup();
});

test("an already-aborted signal rejects without sending", async () => {
  const { conn, room, cleanup } = await setupRoom();
  await assert.rejects(room.locks.acquire("segment:1", { action: "trim", signal: AbortSignal.abort() }), (e) => e.code === "aborted");
  assert.equal(conn.all("lock.acquire").length, 0);
  await cleanup();
});

for (const reason of ["expired", "disconnected", "forced", "revoked", "lost"]) {
  test(`lock.released ${reason} → lost(${reason})`, async () => {
    const { conn, room, cleanup } = await setupRoom();
    const lock = await grant(conn, room);
    const lost = nextEvent(lock, "lost");
    conn.send({ type: "lock.released", room: "scene:1", resource: "segment:1", reason });
    assert.equal(await lost, reason);
    assert.equal(lock.state, "lost");
    await cleanup();
  });
}

test("extend updates expiresAt and emits change; autoExtend keeps extending", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const lock = await grant(conn, room);
  const changed = nextEvent(lock, "change");
  const ep = lock.extend(30_000);
  const e = await conn.next("lock.extend");
  assert.deepEqual([e.token, e.ttl_ms], [11, 30_000]);
  conn.send({ type: "reply", id: e.id, room: "scene:1", resource: "segment:1", token: 11, expires_at: 42 });
  await ep;
  assert.equal((await changed).expiresAt, 42);

  const p = room.locks.acquire("segment:2", { action: "trim", ttlMs: 300, autoExtend: { everyMs: 50 } });
  const a = await conn.next((f) => f.type === "lock.acquire" && f.resource === "segment:2");
  conn.send({ type: "reply", id: a.id, room: "scene:1", resource: "segment:2", token: 5, expires_at: Date.now() + 300 });
  const auto = await p;
  for (let i = 0; i < 2; i++) {
    const x = await conn.next((f) => f.type === "lock.extend" && f.resource === "segment:2");
    assert.equal(x.ttl_ms, 300);
    conn.send({ type: "reply", id: x.id, room: "scene:1", resource: "segment:2", token: 5, expires_at: Date.now() + 300 });
  }
  const rp = auto.release();
  const r = await conn.next((f) => f.type === "lock.release" && f.resource === "segment:2");
  conn.send({ type: "reply", id: r.id, room: "scene:1", resource: "segment:2" });
  await rp;
  const n = conn.all("lock.extend").length;
  await sleep(150);
  assert.equal(conn.all("lock.extend").length, n, "auto-extend stops after release");
  await cleanup();
});

test("the lock list follows lock.acquired (replace) and lock.released, with new arrays only on change", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const lists = [];
  room.locks.on("change", (l) => lists.push(l));
  const acquired = { type: "lock.acquired", room: "scene:1", resource: "segment:5", action: "trim", expires_at: 10, holder: { ...holder("bob", "s2"), expires_at: 10 } };
  conn.send(acquired);
  conn.send(acquired);
  conn.send({ ...acquired, expires_at: 20, holder: { ...acquired.holder, expires_at: 20 } });
  conn.send({ type: "lock.released", room: "scene:1", resource: "segment:5", reason: "released" });
  await until(() => lists.length === 3);
  assert.deepEqual(lists.map((l) => l.map((i) => i.expiresAt)), [[10], [20], []]);
  assert.equal(lists[0][0].mine, false);
  await cleanup();
});

test("a resume snapshot that lacks a held lock loses it; one that lists an unknown own lock adopts it", async () => {
  const { server, client, conn, room, cleanup } = await setupRoom();
  const lock = await grant(conn, room);
  const lost = nextEvent(lock, "lost");
  conn.terminate();
  const c2 = await server.nextConnection();
  c2.welcome({ resumed: true, resume_token: "r2" });
  c2.send({
    type: "room.snapshot",
    room: "scene:1",
    members: [member("alice", "s1"), member("bob", "s2")],
    locks: [{ resource: "segment:7", action: "trim", expires_at: Date.now() + 9_000, token: 77, holder: holder("alice", "s1") }],
  });
  assert.equal(await lost, "lost");
  await until(() => room.locks.held.length === 1);
  assert.equal(room.locks.held[0].token, 77);
  assert.equal(client.status, "connected");
  await cleanup();
});

test("forceRelease sends lock.release with force", async () => {
  const { conn, room, cleanup } = await setupRoom();
  const p = room.locks.forceRelease("segment:3");
  const r = await conn.next("lock.release");
  assert.deepEqual([r.room, r.resource, r.force], ["scene:1", "segment:3", true]);
  conn.send({ type: "reply", id: r.id, room: "scene:1", resource: "segment:3" });
  await p;
  await cleanup();
});

test("close() with a release in flight: the release resolves, a pending extend rejects `disconnected`", async () => {
  const { client, conn, room, cleanup } = await setupRoom();
  const lock = await grant(conn, room);
  const rel = lock.release();
  await conn.next("lock.release");
  const other = await grant(conn, room, "segment:2", 12);
  const ext = other.extend(1_000);
  await conn.next("lock.extend");
  client.close();
  await rel;
  await assert.rejects(ext, (e) => e.code === "disconnected");
  assert.equal(lock.state, "released");
  assert.equal(other.state, "lost");
  await cleanup();
});
