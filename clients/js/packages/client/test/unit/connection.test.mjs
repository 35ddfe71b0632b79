// Connection policy against the fake server: URL, status, every close code's behaviour,
// resume tokens, backoff bounds, ping and dead-socket detection, token refresh.
import assert from "node:assert/strict";
import { test } from "node:test";
import { backoffDelay, LockstepError } from "../../dist/index.js";
import { member, nextEvent, sleep, until } from "../fake-server.mjs";
import { connected, joined, setup } from "../helpers.mjs";

test("connect: /v1/ws, token, JSON subprotocol, status connecting → connected", async () => {
  const { server, client, cleanup } = await setup();
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  const p = client.connect();
  const conn = await server.nextConnection();
  assert.equal(conn.url.pathname, "/v1/ws");
  assert.equal(conn.token, "tok1");
  assert.equal(conn.resume, null);
  assert.equal(conn.protocol, "lockstep.v1.json");
  conn.welcome();
  await p;
  assert.deepEqual(statuses, ["connecting", "connected"]);
  assert.equal(client.session.sessionId, "s1");
  assert.equal(client.session.user.name, "Alice");
  await cleanup();
});

test("a dropped socket reconnects with the latest resume token, and a resumed session is not rejoined", async () => {
  const { server, client, conn, cleanup } = await connected({}, { resume_token: "r1" });
  await joined(client, conn, "scene:1", [member("alice", "s1")]);
  const statuses = [];
  client.on("status", (s) => statuses.push(s));
  conn.terminate();
  const c2 = await server.nextConnection();
  assert.equal(c2.resume, "r1");
  assert.equal(c2.token, "tok1", "the cached token is reused");
  c2.welcome({ resumed: true, resume_token: "r2" });
  await until(() => client.status === "connected");
  c2.terminate();
  const c3 = await server.nextConnection();
  assert.equal(c3.resume, "r2", "each welcome's resume token replaces the last");
  c3.welcome({ resumed: true, resume_token: "r3" });
  await until(() => client.status === "connected");
  await sleep(50);
  assert.equal(c2.all("join").length + c3.all("join").length, 0, "no join after a resume");
  assert.deepEqual(statuses, ["reconnecting", "connected", "reconnecting", "connected"]);
  await cleanup();
});

for (const code of [1001, 1009, 1011, 1012, 4008, 4000, 4999]) {
  test(`${code} reconnects with resume (backoff)`, async () => {
    const { server, client, conn, cleanup } = await connected();
    const closed = nextEvent(client, "closed");
    conn.close(code, "x");
    const e = await closed;
    assert.deepEqual([e.code, e.willReconnect], [code, true]);
    const c2 = await server.nextConnection();
    assert.equal(c2.resume, "r1");
    assert.equal(c2.token, "tok1");
    c2.welcome({ resumed: true, resume_token: "r2" });
    await until(() => client.status === "connected");
    await cleanup();
  });
}

test("1012 after `reconnect` waits after_ms, not the backoff", async () => {
  const { server, client, conn, cleanup } = await connected({ reconnectDelayMs: { min: 30_000, max: 60_000 } });
  const t0 = Date.now();
  conn.send({ type: "reconnect", reason: "draining", after_ms: 200 });
  conn.close(1012, "draining");
  const closed = await nextEvent(client, "closed");
  assert.equal(closed.code, 1012);
  assert.equal(closed.willReconnect, true);
  const c2 = await server.nextConnection(10_000);
  assert.ok(Date.now() - t0 >= 190, "waited after_ms");
  assert.equal(c2.resume, "r1");
  await cleanup();
});

test("4001 asks getToken again and resumes; refused again at once, it gives up", async () => {
  const { server, client, conn, tokenCalls, cleanup } = await connected();
  conn.close(4001, "token expired");
  const c2 = await server.nextConnection();
  assert.equal(c2.token, "tok2");
  assert.equal(c2.resume, "r1", "the session is parked: resume it with the new token");
  const errors = [];
  client.on("error", (e) => errors.push(e));
  c2.close(4001, "bad token");
  await until(() => client.status === "disconnected");
  assert.equal(tokenCalls.length, 2);
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, "closed");
  assert.equal(errors[0].closeCode, 4001);
  await sleep(100);
  assert.equal(server.conns.length, 2, "no third attempt");
  await cleanup();
});

test("a first connection refused with 4001 twice (with a fresh token) rejects connect()", async () => {
  const { server, client, tokenCalls, cleanup } = await setup();
  const p = client.connect();
  const conn = await server.nextConnection();
  conn.close(4001, "bad token");
  const c2 = await server.nextConnection();
  assert.equal(c2.token, "tok2");
  c2.close(4001, "bad token");
  await assert.rejects(p, (e) => e instanceof LockstepError && e.code === "closed" && e.closeCode === 4001);
  assert.equal(client.status, "disconnected");
  assert.equal(tokenCalls.length, 2);
  await cleanup();
});

for (const code of [4009, 4011, 4013]) {
  test(`${code} stops: disconnected, error with closeCode, locks lost, no reconnect`, async () => {
    const { server, client, conn, cleanup } = await connected();
    const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
    const p = room.locks.acquire("segment:1", { action: "trim" });
    const a = await conn.next("lock.acquire");
    conn.send({ type: "reply", id: a.id, room: "scene:1", resource: "segment:1", token: 7, expires_at: Date.now() + 60_000 });
    const lock = await p;
    const lost = [];
    lock.on("lost", (r) => lost.push(r));
    const err = nextEvent(client, "error");
    conn.close(code, "stop");
    assert.equal((await err).closeCode, code);
    assert.equal(client.status, "disconnected");
    assert.deepEqual(lost, [code === 4013 ? "revoked" : "session_ended"]);
    assert.equal(room.joined, false);
    assert.deepEqual(room.members, []);
    await assert.rejects(room.updatePresence({ focus: null }), (e) => e.code === "disconnected");
    await sleep(100);
    assert.equal(server.conns.length, 1, "never fights another tab");
    await cleanup();
  });
}

test("1000 from the server ends the client", async () => {
  const { server, client, conn, cleanup } = await connected();
  conn.close(1000, "bye");
  await until(() => client.status === "disconnected");
  await sleep(50);
  assert.equal(server.conns.length, 1);
  await cleanup();
});

test("4010 reconnects as a new session: rejoins with the last presence, old locks lost", async () => {
  const { server, client, conn, cleanup } = await connected();
  const room = client.room("scene:1");
  const jp = room.join({ state: { mood: "ok" }, focus: "segment:3" });
  const j = await conn.next("join");
  assert.deepEqual(j.state, { mood: "ok" });
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1")], locks: [] });
  conn.send({ type: "reply", id: j.id, room: "scene:1" });
  const pr = await conn.next("presence");
  assert.equal(pr.focus, "segment:3");
  conn.send({ type: "reply", id: pr.id, room: "scene:1" });
  await jp;
  const ap = room.locks.acquire("segment:3", { action: "trim" });
  const a = await conn.next("lock.acquire");
  conn.send({ type: "reply", id: a.id, room: "scene:1", resource: "segment:3", token: 9, expires_at: Date.now() + 60_000 });
  const lock = await ap;
  const lost = nextEvent(lock, "lost");
  conn.close(4010, "heartbeat timeout");
  const c2 = await server.nextConnection();
  assert.equal(c2.resume, null, "4010: the session already ended");
  c2.welcome({ session_id: "s2", resume_token: "r2" });
  assert.equal(await lost, "session_ended");
  const j2 = await c2.next("join");
  assert.deepEqual(j2.state, { mood: "ok" });
  c2.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s2")], locks: [] });
  c2.send({ type: "reply", id: j2.id, room: "scene:1" });
  const p2 = await c2.next("presence");
  assert.equal(p2.focus, "segment:3");
  await until(() => room.self?.sessionId === "s2");
  assert.equal(room.members.length, 1);
  await cleanup();
});

test("4012 asks for a new token and starts a new session", async () => {
  const { server, conn, cleanup } = await connected();
  conn.close(4012, "token expired");
  const c2 = await server.nextConnection();
  assert.equal(c2.token, "tok2");
  assert.equal(c2.resume, null);
  await cleanup();
});

test("close() sends 1000 and rejects pending requests with `disconnected`", async () => {
  const { client, conn, cleanup } = await connected();
  const room = client.room("scene:1");
  const p = room.join();
  await conn.next("join");
  client.close();
  await assert.rejects(p, (e) => e.code === "disconnected");
  assert.equal((await conn.closed).code, 1000);
  assert.equal(client.status, "disconnected");
  await cleanup();
});

test("backoff: full jitter within [min, max], growing with the attempt", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    for (const r of [0, 0.25, 0.5, 0.999999]) {
      const d = backoffDelay(attempt, 250, 20_000, () => r);
      assert.ok(d >= 250 && d <= 20_000, `attempt ${attempt} r ${r}: ${d}`);
    }
  }
  assert.equal(backoffDelay(0, 250, 20_000, () => 0), 250);
  assert.ok(backoffDelay(0, 250, 20_000, () => 0.999) < 500);
  assert.equal(backoffDelay(30, 250, 20_000, () => 0.999999), 20_000);
});

test("backoff delays are used between failed attempts", async () => {
  // Every attempt is refused before welcome; the delays come from `random` → the minimum.
  const { server, client, cleanup } = await setup({ reconnectDelayMs: { min: 150, max: 150 }, random: () => 0 });
  void client.connect().catch(() => {});
  const c1 = await server.nextConnection();
  c1.terminate();
  const t0 = Date.now();
  await server.nextConnection();
  assert.ok(Date.now() - t0 >= 140, "waited the minimum delay");
  assert.equal(client.status, "connecting", "still connecting before the first welcome");
  await cleanup();
});

test("idle: app-level ping; no answer: the socket is dropped (never with 1000) and resumed", async () => {
  const { server, client, conn, cleanup } = await connected({ pingIntervalMs: 100, pongTimeoutMs: 150 });
  await conn.next("ping");
  conn.answerPings = false;
  await conn.next("ping");
  const closed = await nextEvent(client, "closed", 3_000);
  assert.equal(closed.code, 4000);
  assert.equal(closed.willReconnect, true);
  const c2 = await server.nextConnection();
  assert.equal(c2.resume, "r1");
  assert.notEqual((await conn.closed).code, 1000, "the session must not be ended by a dead-socket close");
  await cleanup();
});

test("no ping while frames keep arriving", async () => {
  // Frames every 50 ms against a 1 s interval: only a one-second stall could make it ping.
  const { client, conn, cleanup } = await connected({ pingIntervalMs: 1_000 });
  const t0 = Date.now();
  while (Date.now() - t0 < 1_500) {
    conn.send({ type: "pong" });
    await sleep(50);
  }
  assert.equal(conn.all("ping").length, 0);
  assert.equal(client.status, "connected");
  await cleanup();
});

test("auth.expiring → getToken() → auth.refresh", async () => {
  const { conn, tokenCalls, cleanup } = await connected();
  conn.send({ type: "auth.expiring", expires_at: Date.now() + 1000, in_ms: 1000 });
  const r = await conn.next("auth.refresh");
  assert.equal(r.token, "tok2");
  assert.equal(tokenCalls.length, 2);
  conn.send({ type: "reply", id: r.id, expires_at: Date.now() + 3_600_000 });
  await cleanup();
});

test("an error frame that belongs to no request is emitted as `error`", async () => {
  const { client, conn, cleanup } = await connected();
  const e = nextEvent(client, "error");
  conn.send({ type: "error", code: "rate_limited", message: "slow down" });
  const err = await e;
  assert.ok(err instanceof LockstepError);
  assert.equal(err.code, "rate_limited");
  await cleanup();
});

test("getToken throwing LockstepError('unauthorized') stops: connect() rejects, no socket, no retry", async () => {
  let calls = 0;
  const { server, client, cleanup } = await setup({
    getToken: async () => {
      calls++;
      throw new LockstepError("unauthorized", "signed out");
    },
  });
  const errors = [];
  client.on("error", (e) => errors.push(e));
  await assert.rejects(client.connect(), (e) => e instanceof LockstepError && e.code === "unauthorized");
  assert.equal(client.status, "disconnected");
  await sleep(150);
  assert.equal(calls, 1, "not retried");
  assert.equal(server.conns.length, 0, "no socket opened");
  assert.equal(errors.length, 1);
  await cleanup();
});

test("getToken throwing anything else is retried with backoff", async () => {
  let calls = 0;
  const { server, client, cleanup } = await setup({
    getToken: async () => {
      if (++calls < 3) throw new Error("token service down");
      return "tok";
    },
  });
  const p = client.connect();
  const conn = await server.nextConnection();
  assert.equal(conn.token, "tok");
  conn.welcome();
  await p;
  assert.equal(calls, 3);
  await cleanup();
});
