// Rooms: snapshots (paged), diffing without flapping, stable identities, upserts, cursors.
import assert from "node:assert/strict";
import { test } from "node:test";
import { member, nextEvent, sleep, until } from "../fake-server.mjs";
import { connected, joined } from "../helpers.mjs";

test("join resolves after the snapshot and reply; members, self, others", async () => {
  const { client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1"), member("bob", "s9", { focus: "segment:2", state: { x: 1 } })]);
  assert.equal(room.joined, true);
  assert.deepEqual(room.members.map((m) => m.userId), ["alice", "bob"]);
  assert.equal(room.self.sessionId, "s1");
  assert.deepEqual(room.others.map((m) => m.name), ["BOB"]);
  assert.equal(room.others[0].focus, "segment:2");
  assert.deepEqual(room.others[0].state, { x: 1 });
  await cleanup();
});

test("a paged snapshot is applied once, whole, with events held until the last page", async () => {
  const { client, conn, cleanup } = await connected();
  const room = client.room("scene:1");
  let membersEvents = 0;
  room.on("members", () => membersEvents++);
  const p = room.join();
  const j = await conn.next("join");
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1"), member("bob", "s2")], locks: [], page: 1, pages: 3 });
  await sleep(20);
  assert.equal(room.members.length, 0, "nothing applied before the last page");
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("carol", "s3")], locks: [], page: 2, pages: 3 });
  // An event between pages (the server holds them back, but the SDK copes) follows the snapshot.
  conn.send({ type: "presence.update", room: "scene:1", member: member("bob", "s2", { focus: "segment:8" }) });
  conn.send({
    type: "room.snapshot",
    room: "scene:1",
    members: [],
    locks: [{ resource: "segment:1", action: "trim", expires_at: 5, holder: { user_id: "bob", session_id: "s2", name: "BOB", action: "trim", since: 1, expires_at: 5 } }],
    page: 3,
    pages: 3,
  });
  conn.send({ type: "reply", id: j.id });
  await p;
  assert.deepEqual(room.members.map((m) => m.userId), ["alice", "bob", "carol"]);
  assert.equal(room.members[1].focus, "segment:8", "the held event was applied after the snapshot");
  assert.equal(membersEvents, 2);
  assert.equal(room.locks.list.length, 1);
  assert.equal(room.locks.get("segment:1").holder.name, "BOB");
  await cleanup();
});

test("a resume snapshot equal to local state emits nothing and keeps every identity", async () => {
  const { server, client, conn, cleanup } = await connected();
  const lockEntry = { resource: "segment:1", action: "trim", expires_at: 5, holder: { user_id: "bob", session_id: "s2", name: "BOB", action: "trim", since: 1, expires_at: 5 } };
  const room = await joined(client, conn, "scene:1", [member("alice", "s1"), member("bob", "s2", { state: { a: [1, 2] } })], [lockEntry]);
  const before = { members: room.members, others: room.others, self: room.self, bob: room.members[1], locks: room.locks.list };
  const events = [];
  room.on("members", () => events.push("members"));
  room.on("presence", (e) => events.push(`presence.${e.type}`));
  room.locks.on("change", () => events.push("locks"));
  conn.terminate();
  const c2 = await server.nextConnection();
  c2.welcome({ resumed: true, resume_token: "r2" });
  c2.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1"), member("bob", "s2", { state: { a: [1, 2] } })], locks: [lockEntry] });
  c2.send({ type: "presence.join", room: "scene:1", member: member("bob", "s2", { state: { a: [1, 2] } }) });
  await until(() => client.status === "connected");
  await sleep(50);
  assert.deepEqual(events, [], "no flapping");
  assert.equal(room.members, before.members);
  assert.equal(room.others, before.others);
  assert.equal(room.self, before.self);
  assert.equal(room.locks.list, before.locks);
  // A real change: only it is emitted; unchanged members keep their objects.
  c2.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1"), member("bob", "s2", { state: { a: [3] } }), member("dan", "s4")], locks: [] });
  await until(() => room.members.length === 3);
  assert.deepEqual(events, ["locks", "presence.update", "presence.join", "members"]);
  assert.equal(room.members[0], before.self);
  assert.notEqual(room.members, before.members);
  await cleanup();
});

test("presence events: join is an upsert, update replaces, leave removes the member and its cursor", async () => {
  const { client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  const seen = [];
  room.on("presence", (e) => seen.push(`${e.type}:${e.member.userId}`));
  conn.send({ type: "presence.join", room: "scene:1", member: member("bob", "s2") });
  conn.send({ type: "presence.join", room: "scene:1", member: member("bob", "s2") });
  conn.send({ type: "presence.update", room: "scene:1", member: member("bob", "s2", { focus: "segment:9" }) });
  conn.send({ type: "cursor", room: "scene:1", user_id: "bob", session_id: "s2", x: 1, y: 2 });
  await until(() => room.cursors.size === 1);
  const cursorsBefore = room.cursors;
  conn.send({ type: "presence.leave", room: "scene:1", member: member("bob", "s2") });
  await until(() => room.members.length === 1);
  assert.deepEqual(seen, ["join:bob", "update:bob", "leave:bob"]);
  assert.equal(room.cursors.size, 0);
  assert.notEqual(room.cursors, cursorsBefore);
  await cleanup();
});

test("cursors: throttled, latest wins, nothing queued while offline", async () => {
  const { server, client, conn, cleanup } = await connected({ cursorThrottleMs: 100, reconnectDelayMs: { min: 200, max: 200 } });
  const room = await joined(client, conn, "scene:1", [member("alice", "s1")]);
  for (let i = 0; i < 20; i++) room.moveCursor({ x: i, y: i });
  const first = await conn.next("cursor");
  assert.equal(first.x, 0);
  const second = await conn.next("cursor");
  assert.equal(second.x, 19, "latest wins");
  await sleep(150);
  assert.equal(conn.all("cursor").length, 2);
  conn.terminate();
  await until(() => client.status === "reconnecting");
  room.moveCursor({ x: 99, y: 99 });
  const c2 = await server.nextConnection();
  c2.welcome({ resumed: true, resume_token: "r2" });
  await until(() => client.status === "connected");
  await sleep(150);
  assert.equal(c2.all("cursor").length, 0);
  await cleanup();
});

test("incoming cursors and broadcasts", async () => {
  const { client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1"), member("bob", "s2")]);
  const c = nextEvent(room, "cursor");
  conn.send({ type: "cursor", room: "scene:1", user_id: "bob", session_id: "s2", x: 3, y: 4, selection: { from: 1 } });
  const cursor = await c;
  assert.deepEqual([cursor.userId, cursor.x, cursor.y, cursor.selection], ["bob", 3, 4, { from: 1 }]);
  assert.equal(room.cursors.get("s2"), cursor);
  const b = nextEvent(room, "broadcast");
  conn.send({ type: "broadcast", room: "scene:1", event: "chat", data: { text: "hi" }, from: { user_id: "bob", session_id: "s2", name: "BOB" } });
  assert.deepEqual(await b, { event: "chat", data: { text: "hi" }, from: { userId: "bob", sessionId: "s2", name: "BOB" } });
  await cleanup();
});

test("leave clears members, cursors and locks and emits `left`", async () => {
  const { client, conn, cleanup } = await connected();
  const room = await joined(client, conn, "scene:1", [member("alice", "s1"), member("bob", "s2")]);
  const left = nextEvent(room, "left");
  const p = room.leave();
  const l = await conn.next("leave");
  conn.send({ type: "reply", id: l.id, room: "scene:1" });
  await p;
  await left;
  assert.equal(room.joined, false);
  assert.deepEqual(room.members, []);
  await cleanup();
});
