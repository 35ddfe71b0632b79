// An in-process fake lockstep server on `ws`'s WebSocketServer (free loopback port), scripted
// by each test: it records every connection and client frame, and the test answers by hand.
import { once } from "node:events";
import { WebSocketServer } from "ws";

const WAIT_MS = 5_000;

export class Conn {
  constructor(ws, req) {
    this.ws = ws;
    this.url = new URL(req.url, "http://x");
    this.protocol = ws.protocol;
    this.frames = [];
    this.consumed = new Set();
    this.waiters = [];
    this.answerPings = true;
    this.closed = new Promise((resolve) => ws.on("close", (code, reason) => resolve({ code, reason: reason.toString() })));
    ws.on("message", (data, isBinary) => {
      const f = isBinary ? this.decode(data) : JSON.parse(data.toString());
      this.frames.push(f);
      if (f.type === "ping" && this.answerPings) this.send({ type: "pong" });
      for (const w of [...this.waiters]) w();
    });
  }

  decode() {
    throw new Error("binary frame on a JSON fake");
  }

  get token() {
    return this.url.searchParams.get("token");
  }

  get resume() {
    return this.url.searchParams.get("resume");
  }

  send(obj) {
    this.ws.send(JSON.stringify(obj));
  }

  welcome(fields = {}) {
    this.send({
      type: "welcome",
      session_id: "s1",
      node_id: "n1",
      user: { id: "alice", name: "Alice", color: "red" },
      heartbeat_ms: 30_000,
      server_time: Date.now(),
      resume_token: "r1",
      resumed: false,
      ...fields,
    });
  }

  /** The next client frame matching `pred` (a type name or a predicate) not returned before. */
  next(pred, ms = WAIT_MS) {
    const match = typeof pred === "string" ? (f) => f.type === pred : pred;
    return new Promise((resolve, reject) => {
      const check = () => {
        for (let i = 0; i < this.frames.length; i++) {
          if (!this.consumed.has(i) && match(this.frames[i])) {
            this.consumed.add(i);
            this.waiters = this.waiters.filter((w) => w !== check);
            clearTimeout(timer);
            resolve(this.frames[i]);
            return;
          }
        }
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`no client frame matching ${String(pred)} within ${ms} ms; got ${JSON.stringify(this.frames)}`));
      }, ms);
      this.waiters.push(check);
      check();
    });
  }

  /** Client frames of a type seen so far. */
  all(type) {
    return this.frames.filter((f) => f.type === type);
  }

  close(code, reason = "") {
    this.ws.close(code, reason);
  }

  terminate() {
    this.ws.terminate();
  }
}

export async function fakeServer({ Conn: C = Conn } = {}) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0, handleProtocols: (ps) => [...ps][0] ?? false });
  await once(wss, "listening");
  const conns = [];
  let taken = 0;
  const waiters = [];
  wss.on("connection", (ws, req) => {
    conns.push(new C(ws, req));
    for (const w of [...waiters]) w();
  });
  return {
    url: `http://127.0.0.1:${wss.address().port}`,
    conns,
    /** The next connection not returned before. */
    nextConnection(ms = WAIT_MS) {
      return new Promise((resolve, reject) => {
        const check = () => {
          if (taken < conns.length) {
            waiters.splice(waiters.indexOf(check), 1);
            clearTimeout(timer);
            resolve(conns[taken++]);
          }
        };
        const timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(check), 1);
          reject(new Error(`no new connection within ${ms} ms`));
        }, ms);
        waiters.push(check);
        check();
      });
    },
    async close() {
      for (const c of wss.clients) c.terminate();
      await new Promise((r) => wss.close(r));
    },
  };
}

/** Resolves when `cond()` is true (polled), or rejects after `ms`. */
export async function until(cond, ms = WAIT_MS, what = "condition") {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The next emission of `event` on an SDK emitter. */
export function nextEvent(emitter, event, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${event} event within ${ms} ms`));
    }, ms);
    const off = emitter.on(event, (v) => {
      clearTimeout(timer);
      off();
      resolve(v);
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function member(user, session, extra = {}) {
  return { user_id: user, session_id: session, name: user.toUpperCase(), color: "red", role: "editor", since: 1, ...extra };
}
