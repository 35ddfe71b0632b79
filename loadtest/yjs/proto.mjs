// The pieces every Yjs benchmark scenario shares: the npm modules (taken from tests/yjs's
// node_modules, so the benchmark uses exactly the client versions the tests pin), HS256 tokens,
// a raw y-protocols client over `ws` (no Y.Doc of its own unless asked: a benchmark with 1,000
// editors in one process cannot afford to integrate every update 1,000 times), a latency
// histogram that worker processes can merge, and CPU/RSS readings of other processes.
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '../..');
// CommonJS builds: y-websocket's own `require('yjs')` then resolves to the same Yjs instance.
const requireTests = createRequire(path.join(ROOT, 'tests/yjs/package.json'));
export const Y = requireTests('yjs');
export const WebSocket = requireTests('ws');
export const encoding = requireTests('lib0/encoding');
export const decoding = requireTests('lib0/decoding');
export const { WebsocketProvider } = requireTests('y-websocket');

// y-websocket message types and y-protocols sync steps.
const MSG_SYNC = 0;
const STEP1 = 0;
const STEP2 = 1;
const UPDATE = 2;

const b64url = (s) => Buffer.from(s).toString('base64url');

/** An HS256 JWT (docs/protocol.md "Tokens") giving `sub` the editor role everywhere. */
export function token(secret, sub, ttlSec = 24 * 3600) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, rooms: { '*': 'editor' }, exp: Math.floor(Date.now() / 1000) + ttlSec }));
  const sig = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${sig}`;
}

export function yjsUrl(base, doc, tok) {
  return `${base.replace(/^http/, 'ws')}/v1/yjs/${encodeURIComponent(doc)}?token=${tok}`;
}

function syncMessage(step, payload) {
  const e = encoding.createEncoder();
  encoding.writeVarUint(e, MSG_SYNC);
  encoding.writeVarUint(e, step);
  encoding.writeVarUint8Array(e, payload);
  return encoding.toUint8Array(e);
}

export const updateMessage = (update) => syncMessage(UPDATE, update);

const EMPTY_SV = Y.encodeStateVector(new Y.Doc());
const EMPTY_UPDATE = Y.encodeStateAsUpdate(new Y.Doc());

/**
 * One y-websocket connection speaking y-protocols by hand. It asks for the server's state
 * (SyncStep1 with an empty state vector), answers the server's SyncStep1 with an empty
 * SyncStep2, and hands every received update to `onUpdate`. `synced` resolves at the server's
 * SyncStep2 (what y-websocket calls synced), `closed` with the close code.
 */
export class RawClient {
  constructor(url, { onUpdate = () => {}, onStep2 = () => {} } = {}) {
    this.onUpdate = onUpdate;
    this.onStep2 = onStep2;
    this.ws = new WebSocket(url, { perMessageDeflate: false });
    this.ws.binaryType = 'nodebuffer';
    this.closeCode = null;
    this.synced = new Promise((resolve, reject) => {
      this.ws.once('open', () => this.ws.send(syncMessage(STEP1, EMPTY_SV)));
      this.ws.on('message', (data) => {
        try {
          this.receive(data, resolve);
        } catch (e) {
          reject(e);
        }
      });
      this.ws.once('error', reject);
      this.ws.once('close', (code) => reject(new Error(`closed with ${code} before sync`)));
    });
    this.synced.catch(() => {});
    this.closed = new Promise((resolve) =>
      this.ws.once('close', (code) => {
        this.closeCode = code;
        resolve(code);
      }),
    );
    this.ws.on('error', () => {});
  }

  receive(data, resolveSynced) {
    const d = decoding.createDecoder(data);
    if (decoding.readVarUint(d) !== MSG_SYNC) return; // awareness: not measured here
    const step = decoding.readVarUint(d);
    const payload = decoding.readVarUint8Array(d);
    if (step === STEP1) this.ws.send(syncMessage(STEP2, EMPTY_UPDATE));
    else if (step === STEP2) {
      this.onStep2(payload);
      resolveSynced();
    } else if (step === UPDATE) this.onUpdate(payload);
  }

  send(update) {
    this.ws.send(updateMessage(update));
  }

  close() {
    this.ws.close();
    return this.closed;
  }
}

/** Latencies in 10 µs buckets up to 20 s (one past the end counts everything slower). */
export class Histogram {
  static BUCKET_MS = 0.01;
  static BUCKETS = 2_000_000;

  constructor() {
    this.counts = new Uint32Array(Histogram.BUCKETS + 1);
    this.n = 0;
    this.max = 0;
  }

  add(ms) {
    const i = Math.min(Histogram.BUCKETS, Math.max(0, Math.floor(ms / Histogram.BUCKET_MS)));
    this.counts[i]++;
    this.n++;
    if (ms > this.max) this.max = ms;
  }

  /** Sparse form for IPC: [[bucket, count], …]. */
  toJSON() {
    const sparse = [];
    for (let i = 0; i < this.counts.length; i++) if (this.counts[i]) sparse.push([i, this.counts[i]]);
    return { sparse, n: this.n, max: this.max };
  }

  merge({ sparse, n, max }) {
    for (const [i, c] of sparse) this.counts[i] += c;
    this.n += n;
    this.max = Math.max(this.max, max);
  }

  quantile(q) {
    if (!this.n) return null;
    const want = Math.ceil(q * this.n);
    let seen = 0;
    for (let i = 0; i < this.counts.length; i++) {
      seen += this.counts[i];
      if (seen >= want) return round((i + 0.5) * Histogram.BUCKET_MS);
    }
    return round(this.max);
  }

  summary() {
    return {
      samples: this.n,
      p50_ms: this.quantile(0.5),
      p95_ms: this.quantile(0.95),
      p99_ms: this.quantile(0.99),
      p999_ms: this.quantile(0.999),
      max_ms: round(this.max),
    };
  }
}

export const round = (x, digits = 2) => (x == null ? null : Number(x.toFixed(digits)));

const TICKS = 100; // USER_HZ: /proc/<pid>/stat counts CPU in 1/100 s on Linux

/** CPU seconds (user + system) a process has used so far. */
export function cpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / TICKS;
}

/** Resident set size of a process, in bytes. */
export function rssBytes(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Minimal `--key value` / `--flag` parsing with defaults (numbers stay numbers). */
export function parseArgs(argv, defaults) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2).replace(/-/g, '_');
    if (!(key in defaults)) throw new Error(`unknown option ${a}`);
    if (typeof defaults[key] === 'boolean') out[key] = true;
    else {
      const v = argv[++i];
      out[key] = typeof defaults[key] === 'number' ? Number(v) : v;
    }
  }
  return out;
}

/** Opens `n` things through `open(i)` with at most `rate` starts per second and `inflight`
 *  pending at once (a burst of thousands of handshakes would measure the accept queue). */
export async function ramp(n, rate, open, inflight = 64) {
  const out = new Array(n);
  const started = Date.now();
  let next = 0;
  async function lane() {
    for (;;) {
      const i = next++;
      if (i >= n) return;
      const due = started + (i * 1000) / rate;
      if (due > Date.now()) await sleep(due - Date.now());
      out[i] = await open(i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(inflight, n) }, lane));
  return out;
}
