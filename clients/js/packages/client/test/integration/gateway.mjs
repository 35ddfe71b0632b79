// Real `lockstep` processes for the integration tests: a dev-mode node (or one with an HS256
// secret) on a free loopback port with a temp data dir and no inherited LOCKSTEP_* setting,
// a private redis-server, and a switchable TCP proxy standing in for a load balancer.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";
import { Lockstep } from "../../dist/index.js";

const repo = resolve(dirname(fileURLToPath(import.meta.url)), "../../../../../..");
export const BIN = process.env.LOCKSTEP_BIN || join(repo, "target/debug/lockstep");
export const SECRET = "lockstep-js-test-secret-0123456789abcdef";

export function freePort() {
  return new Promise((res, rej) => {
    const s = net.createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

function cleanEnv(extra) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("LOCKSTEP_")) env[k] = v;
  return { ...env, RUST_LOG: "warn", ...extra };
}

async function poll(what, fn, ms = 30_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      if (await fn()) return;
    } catch {
      // not yet
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export async function startGateway(env = {}) {
  if (!existsSync(BIN)) throw new Error(`no lockstep binary at ${BIN}: run \`cargo build --bin lockstep\` or set LOCKSTEP_BIN`);
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "lockstep-js-"));
  const child = spawn(BIN, [], {
    env: cleanEnv({ LOCKSTEP_LISTEN: `127.0.0.1:${port}`, LOCKSTEP_DATA_DIR: dir, ...env }),
    stdio: ["ignore", "ignore", "inherit"],
  });
  const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
  const url = `http://127.0.0.1:${port}`;
  await poll(`${BIN} ready on ${port}`, async () => (await fetch(`${url}/readyz`)).ok);
  return {
    port,
    url,
    exited,
    /** SIGTERM (drain) and wait for the exit. */
    async terminate() {
      child.kill("SIGTERM");
      return exited;
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function devToken(url, sub, name = sub, rooms = undefined) {
  const r = await fetch(`${url}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(rooms ? { sub, name, rooms } : { sub, name }),
  });
  if (!r.ok) throw new Error(`dev token: ${r.status} ${await r.text()}`);
  return (await r.json()).token;
}

const b64url = (b) => Buffer.from(b).toString("base64url");

/** An HS256 JWT signed with `SECRET`; `ttlS` seconds to `exp`. */
export function mintToken(sub, { ttlS = 3600, rooms = { "*": "editor" }, name = sub } = {}) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub, name, rooms, exp: Math.floor(Date.now() / 1000) + ttlS }));
  const sig = createHmac("sha256", SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

/** `ws`'s WebSocket, remembering every socket so a test can cut one. */
export function trackingWebSocket() {
  const sockets = [];
  class Tracking extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  return { WebSocket: Tracking, sockets };
}

export function client(url, getToken, opts = {}) {
  return new Lockstep({ url, getToken, WebSocket, reconnectDelayMs: { min: 20, max: 200 }, ...opts });
}

export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  const exited = new Promise((r) => child.once("exit", r));
  await poll("redis-server", () => new Promise((res) => {
    const s = net.connect(port, "127.0.0.1");
    s.once("connect", () => {
      s.write("PING\r\n");
      s.once("data", (d) => {
        s.destroy();
        res(d.toString().startsWith("+PONG"));
      });
    });
    s.once("error", () => res(false));
  }));
  return {
    url: `redis://127.0.0.1:${port}`,
    async stop() {
      if (child.exitCode === null) {
        child.kill("SIGKILL");
        await exited;
      }
    },
  };
}

/**
 * A TCP proxy; new connections go to `target` (change it to move traffic, as a load balancer
 * would). `freeze()` turns the current connections into a silent path (a laptop that changed
 * network): nothing is forwarded any more and neither side learns that the other went away.
 */
export async function tcpProxy(targetPort) {
  const pairs = new Set();
  const state = { target: targetPort };
  const server = net.createServer((inbound) => {
    const outbound = net.connect(state.target, "127.0.0.1");
    const pair = { inbound, outbound, frozen: false };
    pairs.add(pair);
    inbound.pipe(outbound).pipe(inbound);
    const end = () => {
      if (pair.frozen) return;
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on("error", end).on("close", end);
    outbound.on("error", end).on("close", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    state,
    freeze() {
      for (const p of pairs) {
        p.frozen = true;
        p.inbound.unpipe(p.outbound);
        p.outbound.unpipe(p.inbound);
        p.inbound.pause();
        p.outbound.pause();
      }
    },
    async close() {
      for (const p of pairs) {
        p.inbound.destroy();
        p.outbound.destroy();
      }
      await new Promise((r) => server.close(r));
    },
  };
}
