// Shared setup for the unit tests: a client with short timers against the fake server.
import WebSocket from "ws";
import { Lockstep } from "../dist/index.js";
import { fakeServer } from "./fake-server.mjs";

export async function setup(opts = {}, serverOpts = {}) {
  const server = await fakeServer(serverOpts);
  let tokens = 0;
  const tokenCalls = [];
  const client = new Lockstep({
    url: server.url,
    WebSocket,
    getToken: async () => {
      const t = `tok${++tokens}`;
      tokenCalls.push(t);
      return t;
    },
    reconnectDelayMs: { min: 10, max: 40 },
    requestTimeoutMs: 2_000,
    ...opts,
  });
  const cleanup = async () => {
    client.close();
    await server.close();
  };
  return { server, client, tokenCalls, cleanup };
}

/** A client that is connected (first welcome answered). */
export async function connected(opts = {}, welcome = {}) {
  const env = await setup(opts);
  const p = env.client.connect();
  const conn = await env.server.nextConnection();
  conn.welcome(welcome);
  await p;
  return { ...env, conn };
}

/** Joins `room` on `conn`, answering with a snapshot of `members` (the client's own member first). */
export async function joined(client, conn, room, members, locks = []) {
  const r = client.room(room);
  const p = r.join();
  const j = await conn.next("join");
  conn.send({ type: "room.snapshot", room, members, locks });
  conn.send({ type: "reply", id: j.id, room });
  await p;
  return r;
}
