// Test harness: a DOM (happy-dom) for react-dom, one real `lockstep` node in dev mode on a free
// loopback port, dev tokens, and helpers to render with `act` and to wait for a condition
// without fixed sleeps.
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Window } from "happy-dom";

// react-dom reads `window`/`document` when it loads, so the DOM comes first.
const win = new Window({ url: "http://localhost/" });
globalThis.window = win;
globalThis.document = win.document;
// Node 20 has no global navigator; react-dom sniffs the user agent when it loads.
if (typeof globalThis.navigator === "undefined") globalThis.navigator = win.navigator;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

const { act, createElement } = await import("react");
const { createRoot } = await import("react-dom/client");
const { default: WebSocket } = await import("ws");
const { Lockstep } = await import("@lockstep/client");

export { createElement as h, act };

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../../../../..");

function findBinary() {
  const candidates = [
    process.env.LOCKSTEP_BIN,
    process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, "debug/lockstep"),
    join(repo, "target/debug/lockstep"),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) {
    throw new Error(
      `no lockstep binary (looked at ${candidates.join(", ")}): run \`cargo build --bin lockstep\` ` +
        "in the repository or set LOCKSTEP_BIN",
    );
  }
  return found;
}

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Starts a dev-mode node; resolves to `{ url, stop }` once `/healthz` answers. */
export async function startServer() {
  const bin = findBinary();
  const port = await freePort();
  const dataDir = mkdtempSync(join(tmpdir(), "lockstep-react-"));
  // Dev mode needs no JWT key: drop any LOCKSTEP_* settings inherited from the caller.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("LOCKSTEP_")));
  env.LOCKSTEP_LISTEN = `127.0.0.1:${port}`;
  env.LOCKSTEP_DATA_DIR = dataDir;
  const child = spawn(bin, [], { env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (d) => {
    log = (log + d).slice(-20_000);
  });
  let exited = null;
  child.on("exit", (code, signal) => {
    exited = { code, signal };
  });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (exited) throw new Error(`lockstep exited early (${JSON.stringify(exited)}):\n${log}`);
    try {
      const res = await fetch(`${url}/healthz`);
      if (res.ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error(`lockstep not healthy on ${url} after 30 s:\n${log}`);
    await sleep(50);
  }
  return {
    url,
    log: () => log,
    async stop() {
      if (!exited) {
        const gone = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
        await gone;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A dev token for `sub`, editor everywhere. */
export async function devToken(url, sub, name = sub, rooms = { "*": "editor" }) {
  const res = await fetch(`${url}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ sub, name, rooms }),
  });
  if (!res.ok) throw new Error(`dev token for ${sub}: HTTP ${res.status} ${await res.text()}`);
  return (await res.json()).token;
}

/** Options for a `Lockstep` client of `sub` on `url` (Node has no global WebSocket: pass `ws`). */
export function clientOptions(url, sub, name = sub) {
  return { url, getToken: () => devToken(url, sub, name), WebSocket };
}

export function newClient(url, sub, name = sub) {
  return new Lockstep(clientOptions(url, sub, name));
}

const mounted = new Set();

/** Renders `element` into a fresh container inside `act`. */
export async function render(element) {
  const container = document.createElement("div");
  document.body.appendChild(container);
  const root = createRoot(container);
  await act(async () => {
    root.render(element);
  });
  const view = {
    container,
    async unmount() {
      if (!mounted.delete(view)) return;
      await act(async () => root.unmount());
      container.remove();
    },
  };
  mounted.add(view);
  return view;
}

/**
 * Unmounts whatever a failed test left mounted, so provider-created clients close and stop
 * reconnecting (which would keep the test process alive after the server is gone).
 */
export async function unmountAll() {
  for (const view of [...mounted]) await view.unmount();
  // Deferred leaves and closes run one macrotask after the unmount.
  await act(async () => {
    await sleep(10);
  });
}

/**
 * Polls `cond` until it is truthy, letting React flush inside `act` between checks (the
 * server's events arrive on the socket while `act` waits). Generous default timeout: the
 * machine is shared and noisy; a passing run takes milliseconds.
 */
export async function waitFor(cond, what = "condition", timeoutMs = 15_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let last;
    try {
      const v = cond();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await act(async () => {
      await sleep(20);
    });
  }
}

let counter = 0;
/** A room name no other test uses. */
export function freshRoom() {
  counter += 1;
  return `scene:react-${process.pid}-${counter}`;
}
