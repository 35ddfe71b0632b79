// @lockstep/react against a real dev-mode lockstep node: React 19 + react-dom/client under
// happy-dom, two clients over real WebSockets (`ws`).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { StrictMode, useState } from "react";
import { act, clientOptions, freshRoom, h, newClient, render, sleep, startServer, unmountAll, waitFor } from "./harness.mjs";
import {
  LockstepProvider,
  RoomProvider,
  shallow,
  useBroadcast,
  useCursors,
  useLock,
  useLocks,
  useMembers,
  useMoveCursor,
  useMyPresence,
  useOthers,
  useSelf,
  useStatus,
} from "../dist/index.js";

let server;
const clients = [];
function client(sub, name) {
  const c = newClient(server.url, sub, name);
  clients.push(c);
  return c;
}

before(async () => {
  server = await startServer();
});
after(async () => {
  await unmountAll();
  for (const c of clients) c.close();
  await server?.stop();
});

/** `<LockstepProvider client><RoomProvider room>{child}</RoomProvider></LockstepProvider>` */
function inRoom(c, room, child, extra = {}) {
  return h(LockstepProvider, { client: c }, h(RoomProvider, { room, ...extra }, child));
}

test("two providers see each other in useMembers, useOthers and useSelf", async () => {
  const room = freshRoom();
  const probes = { alice: {}, bob: {} };
  function Roster({ probe }) {
    probe.status = useStatus();
    probe.names = useMembers((ms) => ms.map((m) => m.name).sort().join(","));
    probe.others = useOthers((os) => os.map((m) => m.userId), shallow);
    probe.self = useSelf((s) => s?.userId ?? null);
    probe.cursors = useCursors();
    probe.move = useMoveCursor();
    return h("p", null, probe.names);
  }
  const a = await render(inRoom(client("alice", "Alice"), room, h(Roster, { probe: probes.alice })));
  const b = await render(inRoom(client("bob", "Bob"), room, h(Roster, { probe: probes.bob })));

  await waitFor(() => probes.alice.names === "Alice,Bob" && probes.bob.names === "Alice,Bob", "both see both");
  assert.equal(probes.alice.status, "connected");
  assert.equal(probes.alice.self, "alice");
  assert.deepEqual(probes.alice.others, ["bob"]);
  assert.equal(probes.bob.self, "bob");
  assert.deepEqual(probes.bob.others, ["alice"]);
  assert.equal(a.container.textContent, "Alice,Bob", "the DOM shows what the hook returned");

  await act(async () => probes.alice.move({ x: 10, y: 20 }));
  const cursor = await waitFor(() => [...probes.bob.cursors.values()][0], "bob sees alice's cursor");
  assert.equal(cursor.userId, "alice");
  assert.deepEqual([cursor.x, cursor.y], [10, 20]);
  assert.equal(probes.alice.cursors.size, 0, "no cursor of one's own");

  await b.unmount();
  await waitFor(() => probes.alice.names === "Alice", "bob's leave reaches alice");
  assert.deepEqual(probes.alice.others, []);
  await a.unmount();
});

test("useLock acquire shows the holder in the other's useLocks; a queued wait is granted on release", async () => {
  const room = freshRoom();
  const resource = "segment:7";
  const pa = {};
  const pb = {};
  function LockPanel({ probe }) {
    probe.lock = useLock(resource);
    probe.locks = useLocks();
    probe.members = useMembers((m) => m.length);
    const { info } = probe.lock;
    return h("span", null, info ? `${info.holder.name}:${info.action}` : "free");
  }
  // A second useLock of the same resource in alice's tree, that did not acquire it.
  const badge = {};
  function Badge() {
    badge.lock = useLock(resource).lock;
    return null;
  }
  const a = await render(inRoom(client("alice", "Alice"), room, h("div", null, h(LockPanel, { probe: pa }), h(Badge))));
  const b = await render(inRoom(client("bob", "Bob"), room, h(LockPanel, { probe: pb })));
  await waitFor(() => pa.members === 2 && pb.members === 2, "both joined");

  let lock;
  await act(async () => {
    lock = await pa.lock.acquire({ action: "approve", ttlMs: 60_000 });
  });
  assert.ok(lock.token > 0, "a fencing token");
  assert.equal(pa.lock.lock, lock, "useLock exposes this session's handle");
  assert.equal(badge.lock, lock, "and so does another useLock of the resource");
  assert.equal(pa.lock.info.mine, true);
  assert.equal(pa.lock.pending, false);
  await waitFor(() => pb.locks.length === 1, "bob sees the lock");
  assert.equal(pb.locks[0].holder.name, "Alice");
  assert.equal(pb.locks[0].resource, resource);
  assert.equal(pb.locks[0].mine, false);
  assert.equal(pb.lock.lock, null, "bob holds nothing");
  assert.equal(b.container.textContent, "Alice:approve");

  // Denied without waiting: the error is returned and kept in the hook's state.
  let denied;
  await act(async () => {
    denied = await pb.lock.acquire({ action: "trim" }).catch((e) => e);
  });
  assert.equal(denied.code, "lock_held");
  assert.equal(denied.holder.name, "Alice");
  assert.equal(pb.lock.error?.code, "lock_held");
  assert.equal(pb.lock.pending, false);

  // Queued: pending with a queue position until alice releases, then bob holds it.
  let granted;
  await act(async () => {
    granted = pb.lock.acquire({ action: "trim", wait: true, waitTimeoutMs: 30_000 });
  });
  await waitFor(() => pb.lock.queued?.queuePosition === 1, "bob queued first in line");
  assert.equal(pb.lock.pending, true);
  assert.equal(pb.lock.error, null, "a new call clears the last error");

  await act(async () => {
    await pa.lock.release();
  });
  let bobs;
  await act(async () => {
    bobs = await granted;
  });
  assert.ok(bobs.token > lock.token, "the next holder's token is higher");
  await waitFor(() => pb.lock.lock === bobs && pb.lock.pending === false, "bob's hook shows the grant");
  await waitFor(() => pa.locks.length === 1 && pa.locks[0].holder.name === "Bob", "alice sees bob holding it");
  assert.equal(pa.lock.lock, null);
  assert.equal(badge.lock, null);
  assert.equal(a.container.textContent, "Bob:trim");

  await act(async () => {
    await pb.lock.release();
  });
  await waitFor(() => pa.locks.length === 0 && pb.locks.length === 0, "release clears it for both");
  assert.equal(a.container.textContent, "free");
  await a.unmount();
  await b.unmount();
});

test("a selector whose result does not change does not re-render", async () => {
  const room = freshRoom();
  const renders = { count: 0, ids: 0, all: 0 };
  const seen = {};
  function Count() {
    renders.count += 1;
    seen.count = useMembers((ms) => ms.length);
    return null;
  }
  function Ids() {
    renders.ids += 1;
    // A new array on every call, made equal by `shallow`.
    seen.ids = useOthers((os) => os.map((m) => m.userId), shallow);
    return null;
  }
  function All() {
    renders.all += 1;
    seen.bobFocus = useOthers().find((m) => m.userId === "bob")?.focus ?? null;
    return null;
  }
  const a = await render(inRoom(client("alice", "Alice"), room, h("div", null, h(Count), h(Ids), h(All))));
  const bob = client("bob", "Bob");
  const bobRoom = bob.room(room);
  // Awaited inside act: the updates they cause in alice's components are flushed by it.
  await act(async () => {
    await bob.connect();
    await bobRoom.join();
  });
  await waitFor(() => seen.count === 2 && seen.ids.length === 1, "alice sees bob");

  const before = { ...renders };
  for (const focus of ["segment:1", "segment:2", "segment:3"]) {
    await act(() => bobRoom.updatePresence({ focus }));
    await waitFor(() => seen.bobFocus === focus, `alice sees bob's focus ${focus}`);
  }
  assert.ok(renders.all >= before.all + 3, `the unselected hook re-rendered (${before.all} → ${renders.all})`);
  assert.equal(renders.count, before.count, "useMembers(length) did not re-render");
  assert.equal(renders.ids, before.ids, "useOthers(ids, shallow) did not re-render");

  await act(() => bobRoom.leave());
  await waitFor(() => seen.count === 1, "bob's leave reaches alice");
  assert.ok(renders.count > before.count, "and a real change does re-render");
  await a.unmount();
});

/** Bob joins `room` with the plain client and records alice's joins and leaves (not updates). */
async function bobWatchesAlice(room) {
  const bob = client("bob", "Bob");
  await bob.connect();
  const events = [];
  const bobRoom = bob.room(room);
  bobRoom.on("presence", (e) => {
    if (e.member.userId === "alice" && e.type !== "update") events.push(e.type);
  });
  await bobRoom.join();
  return { bob, bobRoom, events };
}

test("StrictMode double mount joins once and unmount leaves once", async () => {
  const room = freshRoom();
  // Bob watches with the plain client, counting alice's joins and leaves.
  const { bob, bobRoom, events } = await bobWatchesAlice(room);

  const probe = {};
  function Me() {
    const [presence, update] = useMyPresence();
    probe.presence = presence;
    probe.update = update;
    probe.selfCount = useMembers((ms) => ms.filter((m) => m.userId === "alice").length);
    return null;
  }
  const alice = client("alice", "Alice");
  const view = await render(
    h(StrictMode, null, inRoom(alice, room, h(Me), { initialPresence: { focus: "segment:1" } })),
  );
  await waitFor(() => probe.selfCount === 1, "alice joined");
  // The client sends the focus in a presence message right after the join: wait for its echo.
  await waitFor(() => probe.presence.focus === "segment:1", "initialPresence's focus reaches the room");
  await act(async () => {
    await probe.update({ focus: "segment:2" });
  });
  // Events arrive in order: once bob sees the update, any join/leave flapping from the double
  // mount would already be in `events`.
  await waitFor(
    () => bobRoom.members.some((m) => m.userId === "alice" && m.focus === "segment:2"),
    "bob sees alice's update",
  );
  await waitFor(() => probe.presence.focus === "segment:2", "useMyPresence shows the update");
  assert.deepEqual(events, ["join"], "one join, no leave");
  assert.equal(bobRoom.members.filter((m) => m.userId === "alice").length, 1);

  await view.unmount();
  await waitFor(() => events.length === 2, "bob sees alice leave");
  assert.deepEqual(events, ["join", "leave"]);
  assert.equal(alice.room(room).joined, false, "the room was left");
  assert.equal(alice.status, "connected", "an app-owned client stays connected");
});

test("LockstepProvider with options connects, and closes on unmount, once under StrictMode", async () => {
  const room = freshRoom();
  const bob = client("bob", "Bob");
  await bob.connect();
  const bobRoom = bob.room(room);
  await bobRoom.join();

  const probe = {};
  const heard = [];
  function Chat() {
    probe.status = useStatus();
    probe.others = useOthers((os) => os.length);
    probe.send = useBroadcast("chat", (e) => heard.push(`${e.from.name}: ${e.data.text}`));
    return null;
  }
  const view = await render(
    h(
      StrictMode,
      null,
      h(
        LockstepProvider,
        { options: clientOptions(server.url, "carol", "Carol") },
        h(RoomProvider, { room }, h(Chat)),
      ),
    ),
  );
  await waitFor(() => probe.status === "connected" && probe.others === 1, "carol connected and joined");
  const sessions = () => bobRoom.members.filter((m) => m.userId === "carol").length;
  await waitFor(() => sessions() === 1, "bob sees carol");

  await bobRoom.broadcast("chat", { text: "hello" });
  await waitFor(() => heard.length === 1, "carol's handler hears bob");
  assert.deepEqual(heard, ["Bob: hello"]);
  const got = [];
  bobRoom.on("broadcast", (e) => got.push(e.data.text));
  await act(async () => {
    await probe.send({ text: "hi bob" });
  });
  await waitFor(() => got.length === 1, "bob hears carol");
  assert.equal(sessions(), 1, "one session for carol: StrictMode did not open a second client");

  await view.unmount();
  await waitFor(() => sessions() === 0, "the provider's client closed and its session ended");
});

test("unmounting a useLock with a queued wait cancels the wait", async () => {
  const room = freshRoom();
  const resource = "segment:9";
  const pa = {};
  const pb = {};
  function Holder() {
    pa.lock = useLock(resource);
    pa.members = useMembers((m) => m.length);
    return null;
  }
  function Waiter() {
    pb.lock = useLock(resource);
    return null;
  }
  function Bob() {
    const [show, setShow] = useState(true);
    pb.hide = () => setShow(false);
    pb.members = useMembers((m) => m.length);
    return show ? h(Waiter) : null;
  }
  await render(inRoom(client("alice", "Alice"), room, h(Holder)));
  const bob = client("bob", "Bob");
  await render(inRoom(bob, room, h(Bob)));
  await waitFor(() => pa.members === 2 && pb.members === 2, "both joined");

  let first;
  await act(async () => {
    first = await pa.lock.acquire({ action: "approve" });
  });
  let waiting;
  await act(async () => {
    waiting = pb.lock.acquire({ action: "trim", wait: true, waitTimeoutMs: 30_000 });
    waiting.catch(() => {});
  });
  await waitFor(() => pb.lock.queued?.queuePosition === 1, "bob queued");

  await act(async () => pb.hide());
  // The server handles one session's frames in order: once this reply is back, the
  // cancel_wait sent on unmount has been processed.
  await act(() => bob.room(room).updatePresence({ focus: resource }));
  await act(() => pa.lock.release());
  // Had bob still been queued, the release would have handed him the lock and this would be
  // lock_held; bob's session is still in the room, so only the cancel_wait explains success.
  let second;
  await act(async () => {
    second = await pa.lock.acquire({ action: "approve" });
  });
  await assert.rejects(waiting, (e) => e.code === "aborted", "the wait ended as aborted");
  assert.ok(second.token > first.token);
  assert.equal(pa.lock.info?.holder.name, "Alice");
});

test("two RoomProviders of one room join once; the room is left when the last one unmounts", async () => {
  const room = freshRoom();
  const { bob, bobRoom, events } = await bobWatchesAlice(room);

  const alice = client("alice", "Alice");
  const probe = {};
  function Me() {
    probe.count = useMembers((ms) => ms.length);
    return null;
  }
  function Two() {
    const [second, setSecond] = useState(true);
    probe.hideSecond = () => setSecond(false);
    return h(
      "div",
      null,
      h(RoomProvider, { room }, h(Me)),
      second ? h(RoomProvider, { room }, h("span", null, "second")) : null,
    );
  }
  const view = await render(h(LockstepProvider, { client: alice }, h(Two)));
  await waitFor(() => probe.count === 2, "alice joined");

  await act(async () => probe.hideSecond());
  // A leave would be sent by a 0 ms timer set during the unmount; this later timer fires
  // after it (Node runs due timers in order), so the update below is sent after any leave,
  // and bob seeing the update means he would have seen that leave first.
  await act(() => sleep(10));
  await act(() => alice.room(room).updatePresence({ focus: "segment:5" }));
  await waitFor(
    () => bobRoom.members.some((m) => m.userId === "alice" && m.focus === "segment:5"),
    "bob sees alice's update",
  );
  assert.deepEqual(events, ["join"], "the remaining provider keeps the room joined");
  assert.equal(alice.room(room).joined, true);

  await view.unmount();
  await waitFor(() => events.length === 2, "bob sees alice leave");
  assert.deepEqual(events, ["join", "leave"]);
});
