// Requests: ids, timeouts counted from the call, the offline queue and its cap, re-sending
// after a dropped socket (but not broadcasts).
import assert from "node:assert/strict";
import { test } from "node:test";
import { member, until } from "../fake-server.mjs";
import { connected, joined, setup } from "../helpers.mjs";

test("a request with no answer rejects with `timeout`", async () => {
  const { client, conn, cleanup } = await connected({ requestTimeoutMs: 200 });
  const t0 = Date.now();
  await assert.rejects(client.room("scene:1").join(), (e) => e.code === "timeout" && typeof e.requestId === "number");
  assert.ok(Date.now() - t0 >= 190);
  assert.equal(conn.all("join").length, 1);
  await cleanup();
});

test("ids are distinct u32s, echoed replies resolve the right request", async () => {
  const { client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  const a = room.updatePresence({ focus: "a:1" });
  const b = room.updatePresence({ focus: "b:1" });
  const fa = await conn.next("presence");
  const fb = await conn.next("presence");
  assert.notEqual(fa.id, fb.id);
  assert.ok(Number.isInteger(fa.id) && fa.id > 0 && fa.id <= 0xffffffff);
  conn.send({ type: "reply", id: fb.id });
  await b;
  conn.send({ type: "error", id: fa.id, code: "too_large", message: "state too large" });
  await assert.rejects(a, (e) => e.code === "too_large" && e.requestId === fa.id);
  await cleanup();
});

test("offline: requests wait for the connection and go out after welcome; past the cap, queue_full", async () => {
  const { server, client, conn, cleanup } = await connected({ maxPendingRequests: 3, reconnectDelayMs: { min: 300, max: 300 } });
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  conn.terminate();
  await until(() => client.status === "reconnecting");
  const p1 = room.updatePresence({ focus: "x:1" });
  const p2 = room.updatePresence({ focus: "x:2" });
  const p3 = room.updatePresence({ focus: "x:3" });
  await assert.rejects(room.updatePresence({ focus: "x:4" }), (e) => e.code === "queue_full");
  const c2 = await server.nextConnection();
  assert.equal(c2.frames.length, 0, "nothing is sent before welcome");
  c2.welcome({ resumed: true, resume_token: "r2" });
  for (const focus of ["x:1", "x:2", "x:3"]) {
    const f = await c2.next("presence");
    assert.equal(f.focus, focus, "in call order");
    c2.send({ type: "reply", id: f.id });
  }
  await Promise.all([p1, p2, p3]);
  await cleanup();
});

test("the timeout counts offline time", async () => {
  const { client, conn, cleanup } = await connected({ requestTimeoutMs: 200, reconnectDelayMs: { min: 5_000, max: 5_000 } });
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  conn.terminate();
  await until(() => client.status === "reconnecting");
  await assert.rejects(room.updatePresence({ focus: "x:1" }), (e) => e.code === "timeout");
  await cleanup();
});

test("a request in flight on a dropped socket is sent again; a broadcast is not", async () => {
  const { server, client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  const pres = room.updatePresence({ focus: "x:1" });
  const bc = room.broadcast("chat", { text: "hi" });
  await conn.next("presence");
  await conn.next("broadcast");
  conn.terminate();
  await assert.rejects(bc, (e) => e.code === "disconnected");
  const c2 = await server.nextConnection();
  c2.welcome({ resumed: true, resume_token: "r2" });
  const f = await c2.next("presence");
  c2.send({ type: "reply", id: f.id });
  await pres;
  assert.equal(c2.all("broadcast").length, 0);
  await cleanup();
});

test("requests before connect() are queued; after close() they reject at once", async () => {
  const { server, client, cleanup } = await setup();
  const room = client.room("scene:1");
  const jp = room.join();
  const cp = client.connect();
  const conn = await server.nextConnection();
  conn.welcome();
  await cp;
  const j = await conn.next("join");
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1")], locks: [] });
  conn.send({ type: "reply", id: j.id });
  await jp;
  client.close();
  await assert.rejects(room.updatePresence({ focus: null }), (e) => e.code === "disconnected");
  await cleanup();
});
