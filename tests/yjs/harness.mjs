// The test cluster for the Yjs tests: owns a private redis-server (free port, no persistence,
// or AOF for restart tests), an optional private PostgreSQL (initdb/pg_ctl into a temp dir, as
// tests/common/postgres.rs does), and N lockstep nodes sharing them, plus HS256 tokens minted
// here with node:crypto. Everything it starts is stopped when the test's `cleanup()` runs or
// the process exits, so a failed assertion never leaves a server behind.
import { spawn, spawnSync } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const LOCKSTEP_BIN =
  process.env.LOCKSTEP_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, 'target'), 'debug', 'lockstep');

/** Polls `fn` until it returns a truthy value (or throws `what` after `timeoutMs`). Generous
 *  timeouts: the machine is shared and small, and a poll never makes a passing test slower. */
export async function waitFor(fn, what, timeoutMs = 20000, everyMs = 25) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

function canConnect(port) {
  return new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1');
    c.once('connect', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  });
}

const b64url = (buf) => Buffer.from(buf).toString('base64url');

/** An HS256 JWT with the claims of docs/protocol.md "Tokens". */
export function mintToken(secret, { sub, name = sub, rooms, ttlSec = 3600, ...extra }) {
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const exp = Math.floor(Date.now() / 1000) + ttlSec;
  const body = b64url(JSON.stringify({ sub, name, rooms, exp, ...extra }));
  const sig = createHmac('sha256', secret).update(`${header}.${body}`).digest('base64url');
  return `${header}.${body}.${sig}`;
}

const isRoot = process.getuid?.() === 0;

/** A private redis-server. `aof: true` keeps an append-only file (fsync always) in its dir so a
 *  restart on the same port comes back with every acknowledged write. */
export class Redis {
  constructor({ aof = false } = {}) {
    this.aof = aof;
    this.dir = mkdtempSync(path.join(tmpdir(), 'lockstep-yjs-redis-'));
    this.proc = null;
  }

  async start() {
    this.port ??= await freePort();
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--dir', this.dir];
    if (this.aof) args.push('--appendonly', 'yes', '--appendfsync', 'always');
    else args.push('--appendonly', 'no');
    this.proc = spawn('redis-server', args, { stdio: ['ignore', 'ignore', 'inherit'] });
    const proc = this.proc;
    this.exited = new Promise((r) => proc.once('exit', r));
    await waitFor(() => canConnect(this.port), `redis-server on ${this.port}`);
    return this;
  }

  get url() { return `redis://127.0.0.1:${this.port}`; }

  /** Runs one command with redis-cli and returns its raw output. */
  cli(...args) {
    const out = spawnSync('redis-cli', ['-p', String(this.port), ...args], { encoding: 'utf8' });
    if (out.status !== 0) throw new Error(`redis-cli ${args.join(' ')}: ${out.stderr}`);
    return out.stdout.trim();
  }

  async kill(signal = 'SIGKILL') {
    if (!this.proc || this.proc.exitCode !== null || this.proc.signalCode) return;
    this.proc.kill(signal);
    await this.exited;
  }

  async cleanup() {
    await this.kill();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

function pgBinDir() {
  const base = '/usr/lib/postgresql';
  const dirs = existsSync(base)
    ? readdirSync(base).map((v) => path.join(base, v, 'bin')).filter((d) => existsSync(path.join(d, 'initdb'))).sort()
    : [];
  if (!dirs.length) throw new Error('PostgreSQL binaries not found under /usr/lib/postgresql (apt-get install -y postgresql)');
  return dirs.at(-1);
}

/** Runs a PostgreSQL tool, through `runuser -u postgres --` as root (Postgres refuses root). */
function pgTool(bin, tool, args) {
  const exe = path.join(bin, tool);
  const out = isRoot
    ? spawnSync('runuser', ['-u', 'postgres', '--', exe, ...args], { encoding: 'utf8' })
    : spawnSync(exe, args, { encoding: 'utf8' });
  return out;
}

/** A private PostgreSQL cluster (trust auth, loopback, fsync off: the tests crash processes,
 *  not the machine). */
export class Postgres {
  async start() {
    this.bin = pgBinDir();
    this.dir = mkdtempSync(path.join(tmpdir(), 'lockstep-yjs-pg-'));
    if (isRoot) {
      const pw = spawnSync('id', ['-u', 'postgres'], { encoding: 'utf8' });
      const gid = spawnSync('id', ['-g', 'postgres'], { encoding: 'utf8' });
      chownSync(this.dir, Number(pw.stdout), Number(gid.stdout));
    }
    const out = pgTool(this.bin, 'initdb', ['-D', this.data, '-A', 'trust', '-U', 'postgres', '--no-sync', '-E', 'UTF8']);
    if (out.status !== 0) throw new Error(`initdb: ${out.stderr}`);
    this.port = await freePort();
    await this.startAgain();
    return this;
  }

  get data() { return path.join(this.dir, 'data'); }
  get url() { return `postgres://postgres@127.0.0.1:${this.port}/postgres`; }

  async startAgain() {
    const opts = `-c listen_addresses=127.0.0.1 -p ${this.port} -k ${this.dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off`;
    const log = path.join(this.dir, 'log');
    const out = pgTool(this.bin, 'pg_ctl', ['-D', this.data, '-o', opts, '-l', log, '-w', 'start']);
    if (out.status !== 0) throw new Error(`pg_ctl start: ${out.stdout}${existsSync(log) ? readFileSync(log, 'utf8') : ''}`);
    await waitFor(() => canConnect(this.port), `postgres on ${this.port}`);
  }

  /** Stops like a crash (immediate: no checkpoint). */
  stop() {
    if (this.dir) pgTool(this.bin, 'pg_ctl', ['-D', this.data, '-m', 'immediate', '-w', 'stop']);
  }

  psql(sql) {
    const out = spawnSync(path.join(this.bin, 'psql'), ['-h', '127.0.0.1', '-p', String(this.port), '-U', 'postgres', '-d', 'postgres', '-At', '-c', sql], { encoding: 'utf8' });
    if (out.status !== 0) throw new Error(`psql ${sql}: ${out.stderr}`);
    return out.stdout.trim();
  }

  async cleanup() {
    this.stop();
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
  }
}

/** One lockstep node. Its log is kept in memory (last 200 lines) and printed when a test asks. */
export class Node {
  constructor(cluster, index) {
    this.cluster = cluster;
    this.id = `yjs-node-${index}`;
    this.dataDir = mkdtempSync(path.join(tmpdir(), `lockstep-yjs-${this.id}-`));
    this.log = [];
    this.proc = null;
  }

  async start() {
    this.port ??= await freePort();
    const env = {};
    // Only what this test sets: an inherited LOCKSTEP_* (a developer's shell) would change the node.
    for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('LOCKSTEP_')) env[k] = v;
    Object.assign(env, {
      LOCKSTEP_LISTEN: `127.0.0.1:${this.port}`,
      LOCKSTEP_NODE_ID: this.id,
      LOCKSTEP_DATA_DIR: this.dataDir,
      LOCKSTEP_JWT_SECRET: this.cluster.secret,
      LOCKSTEP_ADMIN_TOKEN: this.cluster.adminToken,
      RUST_LOG: process.env.RUST_LOG || 'info',
      ...this.cluster.nodeEnv,
    });
    if (this.cluster.redis) env.LOCKSTEP_REDIS_URL = this.cluster.redis.url;
    if (this.cluster.postgres) env.LOCKSTEP_DATABASE_URL = this.cluster.postgres.url;
    if (!existsSync(LOCKSTEP_BIN)) throw new Error(`no lockstep binary at ${LOCKSTEP_BIN} (cargo build --bin lockstep, or set LOCKSTEP_BIN)`);
    const proc = spawn(LOCKSTEP_BIN, [], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    this.exited = new Promise((r) => proc.once('exit', (code, sig) => r({ code, sig })));
    const keep = (chunk) => {
      for (const line of chunk.toString().split('\n')) if (line) this.log.push(line);
      if (this.log.length > 200) this.log.splice(0, this.log.length - 200);
    };
    proc.stdout.on('data', keep);
    proc.stderr.on('data', keep);
    await waitFor(async () => {
      if (proc.exitCode !== null || proc.signalCode) throw new Error(`${this.id} exited early:\n${this.log.join('\n')}`);
      const res = await fetch(`${this.http}/readyz`).catch(() => null);
      return res?.ok;
    }, `${this.id} ready on ${this.port}`, 60000, 50);
    return this;
  }

  get http() { return `http://127.0.0.1:${this.port}`; }
  get ws() { return `ws://127.0.0.1:${this.port}`; }
  get alive() { return this.proc && this.proc.exitCode === null && !this.proc.signalCode; }

  /** SIGKILL (a crash) or SIGTERM (a drain); resolves once the process is gone. */
  async kill(signal = 'SIGKILL') {
    if (!this.alive) return;
    this.proc.kill(signal);
    await this.exited;
  }

  async restart() {
    await this.kill('SIGKILL');
    await this.start();
  }

  // eslint-disable-next-line no-control-regex
  tail(n = 40) { return this.log.slice(-n).join('\n').replace(/\x1b\[[0-9;]*m/g, ''); }

  async cleanup() {
    await this.kill('SIGKILL');
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** Redis (+ Postgres) + N nodes. `await Cluster.start({nodes: 2, postgres: true})`. */
export class Cluster {
  static async start({ nodes = 2, redis = true, aof = false, postgres = false, nodeEnv = {} } = {}) {
    const c = new Cluster();
    c.secret = randomBytes(32).toString('hex');
    c.adminToken = `yjs-test-${randomBytes(16).toString('hex')}`;
    c.nodeEnv = nodeEnv;
    live.add(c);
    try {
      if (redis) c.redis = await new Redis({ aof }).start();
      if (postgres) c.postgres = await new Postgres().start();
      c.nodes = [];
      for (let i = 0; i < nodes; i++) c.nodes.push(new Node(c, i));
      // One at a time: with Postgres, the first node runs the migrations.
      for (const n of c.nodes) await n.start();
    } catch (e) {
      await c.cleanup();
      throw e;
    }
    return c;
  }

  /** Starts one more node on the same Redis/Postgres (a fresh process with nothing loaded). */
  async addNode() {
    const node = new Node(this, this.nodes.length);
    this.nodes.push(node);
    return node.start();
  }

  token(sub, rooms, extra = {}) {
    return mintToken(this.secret, { sub, rooms, ...extra });
  }

  /** Node logs, for a failing test's message. */
  logs(n = 30) {
    return this.nodes.map((node) => `--- ${node.id} (:${node.port}) ---\n${node.tail(n)}`).join('\n');
  }

  async cleanup() {
    live.delete(this);
    for (const n of this.nodes ?? []) await n.cleanup();
    await this.redis?.cleanup();
    await this.postgres?.cleanup();
  }
}

// A test that throws before its `after` hook still must not leave servers running.
const live = new Set();
process.on('exit', () => {
  for (const c of live) {
    for (const n of c.nodes ?? []) if (n.alive) n.proc.kill('SIGKILL');
    if (c.redis?.proc && c.redis.proc.exitCode === null) c.redis.proc.kill('SIGKILL');
    c.postgres?.stop();
  }
});

/** A tiny TCP load balancer: every new connection goes to the first backend whose node is
 *  alive (and accepts), so clients that reconnect after a node dies land on another node, as
 *  behind a real load balancer without sticky sessions. */
export class Balancer {
  constructor(nodes) {
    this.nodes = nodes;
    this.sockets = new Set();
  }

  async start() {
    this.port = await freePort();
    this.server = net.createServer((client) => {
      this.sockets.add(client);
      client.on('close', () => this.sockets.delete(client));
      const node = this.nodes.find((n) => n.alive);
      if (!node) { client.destroy(); return; }
      const upstream = net.connect(node.port, '127.0.0.1');
      this.sockets.add(upstream);
      upstream.on('close', () => { this.sockets.delete(upstream); client.destroy(); });
      client.on('close', () => upstream.destroy());
      upstream.on('error', () => client.destroy());
      client.on('error', () => upstream.destroy());
      client.pipe(upstream);
      upstream.pipe(client);
    });
    await new Promise((r) => this.server.listen(this.port, '127.0.0.1', r));
    return this;
  }

  get ws() { return `ws://127.0.0.1:${this.port}`; }

  async cleanup() {
    for (const s of this.sockets) s.destroy();
    await new Promise((r) => this.server?.close(r) ?? r());
  }
}
