// MessagePack framing against the fake server (subprotocol, binary frames, u64 as numbers,
// no nil for absent fields), the URL rules, and request id wrapping.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Decoder, decode, encode } from "@msgpack/msgpack";
import WebSocket from "ws";
import { Lockstep } from "../../dist/index.js";
import { RequestTable } from "../../dist/requests.js";
import { socketUrl } from "../../dist/url.js";
import { Conn, fakeServer, member } from "../fake-server.mjs";

class MsgpackConn extends Conn {
  decode(data) {
    return decode(data);
  }
  send(obj) {
    this.ws.send(encode(obj));
  }
}

async function msgpackClient(msgpack) {
  const server = await fakeServer({ Conn: MsgpackConn });
  const client = new Lockstep({ url: server.url, WebSocket, getToken: () => "t", encoding: "msgpack", msgpack });
  const p = client.connect();
  const conn = await server.nextConnection();
  return { server, client, conn, connected: p };
}

test("msgpack: lockstep.v1.msgpack, binary frames both ways, u64 tokens as numbers", async () => {
  const { server, client, conn, connected } = await msgpackClient();
  assert.equal(conn.protocol, "lockstep.v1.msgpack");
  conn.welcome();
  await connected;
  const room = client.room("scene:1");
  const jp = room.join();
  const j = await conn.next("join");
  assert.equal("state" in j, false, "an absent state is not sent as nil");
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1")], locks: [] });
  conn.send({ type: "reply", id: j.id });
  await jp;
  const ap = room.locks.acquire("segment:1", { action: "trim" });
  const a = await conn.next("lock.acquire");
  // 2^52 + 1 needs 64 bits on the wire (uint64), like the server's microsecond tokens.
  const token = 2 ** 52 + 1;
  conn.send({ type: "reply", id: a.id, room: "scene:1", resource: "segment:1", token, expires_at: 1_800_000_000_000 });
  const lock = await ap;
  assert.equal(typeof lock.token, "number");
  assert.equal(lock.token, token);
  client.close();
  await server.close();
});

test("msgpack: a codec that decodes 64-bit integers as bigint is folded to numbers", async () => {
  const dec = new Decoder({ useBigInt64: true });
  const { server, client, conn, connected } = await msgpackClient({ encode, decode: (b) => dec.decode(b) });
  conn.welcome({ heartbeat_ms: 2 ** 40 });
  await connected;
  const room = client.room("scene:1");
  const jp = room.join();
  const j = await conn.next("join");
  conn.send({ type: "room.snapshot", room: "scene:1", members: [member("alice", "s1", { since: 2 ** 50 })], locks: [] });
  conn.send({ type: "reply", id: j.id });
  await jp;
  assert.equal(typeof room.self.since, "number");
  assert.equal(room.self.since, 2 ** 50);
  client.close();
  await server.close();
});

test("socket URL: http→ws, https→wss, /v1/ws once, base paths kept, token and resume encoded", () => {
  assert.equal(socketUrl("http://h:1", "a b", null), "ws://h:1/v1/ws?token=a+b");
  assert.equal(socketUrl("https://h/", "t", "r/1"), "wss://h/v1/ws?token=t&resume=r%2F1");
  assert.equal(socketUrl("wss://h/base/", "t", null), "wss://h/base/v1/ws?token=t");
  assert.equal(socketUrl("ws://h/v1/ws", "t", null), "ws://h/v1/ws?token=t");
});

test("request ids wrap at 2^32 - 1 and skip ids still pending", () => {
  const table = new RequestTable(10, 60_000, () => {});
  const first = table.add({ type: "ping" });
  assert.equal(first.pending.id, 1);
  table.next = 0xffffffff;
  const last = table.add({ type: "ping" });
  assert.equal(last.pending.id, 0xffffffff);
  const wrapped = table.add({ type: "ping" });
  assert.equal(wrapped.pending.id, 2, "1 is still pending, so it is skipped");
  for (const r of [first, last, wrapped]) {
    r.promise.catch(() => {});
    r.pending.reject(new Error("done"));
  }
  assert.equal(table.size, 0);
});
