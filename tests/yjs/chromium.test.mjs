// Two headless Chromium contexts edit one Y.Text through y-websocket in the browser (the page
// in page/, bundled here with esbuild and served by a small http server), both on one node and
// then one per node, and each sees the other's text and awareness.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { chromium } from 'playwright-core';
import { Cluster } from './harness.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SKIP = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM_PATH)`;

let cluster;
let server;
let browser;
let dir;
after(async () => {
  await browser?.close();
  await new Promise((r) => (server ? server.close(r) : r()));
  await cluster?.cleanup();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** Bundles page/app.mjs (yjs + y-websocket) and serves it with index.html on a free port. */
async function servePage() {
  dir = mkdtempSync(path.join(tmpdir(), 'lockstep-yjs-page-'));
  const t0 = Date.now();
  await build({
    entryPoints: [path.join(HERE, 'page', 'app.mjs')],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'es2020',
    outfile: path.join(dir, 'app.js'),
    logLevel: 'error',
  });
  console.log(`bundled the page in ${Date.now() - t0} ms`);
  const files = {
    '/': ['text/html', readFileSync(path.join(HERE, 'page', 'index.html'))],
    '/app.js': ['text/javascript', readFileSync(path.join(dir, 'app.js'))],
  };
  server = http.createServer((req, res) => {
    const f = files[req.url.split('?')[0]];
    if (!f) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': f[0] }).end(f[1]);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${server.address().port}/`;
}

let page0;
async function setup() {
  if (browser) return;
  // Postgres too: with several nodes the snapshots must be shared (the embedded file store is per node).
  cluster = await Cluster.start({ nodes: 2, postgres: true });
  page0 = await servePage();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
}

// Both on one node, then one per node: the second needs awareness relayed between nodes.
for (const [label, room, pick] of [
  ['one node', 'scene:1', (n) => [n[0], n[0]]],
  ['two nodes', 'scene:2', (n) => [n[0], n[1]]],
]) test(`two browser contexts on ${label} see each other's text and awareness`, { skip: SKIP }, async () => {
  await setup();
  const open = async (node, name) => {
    const ctx = await browser.newContext();
    const page = await ctx.newPage();
    const errors = [];
    page.on('pageerror', (e) => errors.push(e.message));
    const hash = new URLSearchParams({
      server: `${node.ws}/v1/yjs`,
      room,
      token: cluster.token(name, { 'scene:*': 'editor' }),
      name,
    });
    await page.goto(`${page0}#${hash}`);
    await page.waitForFunction(() => window.yjsPage?.synced === true, null, { timeout: 20000 })
      .catch((e) => { throw new Error(`${name} never synced (${errors.join('; ')}): ${e.message}\n${cluster.logs()}`); });
    return { page, errors };
  };
  const [n0, n1] = pick(cluster.nodes);
  const alice = await open(n0, 'alice');
  const bob = await open(n1, 'bob');

  // Real typing in each context.
  await alice.page.locator('#text').pressSequentially('hello from alice');
  await bob.page.waitForFunction(() => document.getElementById('text').value === 'hello from alice', null, { timeout: 20000 });
  await bob.page.locator('#text').press('End');
  await bob.page.locator('#text').pressSequentially(', and bob');
  const want = 'hello from alice, and bob';
  for (const p of [alice, bob]) {
    await p.page.waitForFunction((w) => document.getElementById('text').value === w && window.yjsPage.text() === w, want, { timeout: 20000 });
  }
  assert.equal(await alice.page.inputValue('#text'), want);
  assert.equal(await bob.page.inputValue('#text'), want);

  // Awareness, both ways.
  const peers = (p, want, what) => p.page
    .waitForFunction((w) => document.getElementById('peers').textContent === w, want, { timeout: 20000 })
    .catch(async (e) => { throw new Error(`${what}: peers shown ${JSON.stringify(await p.page.textContent('#peers'))}, want ${JSON.stringify(want)} (${e.message})`); });
  await peers(alice, 'bob', `alice's page to show bob (${label})`);
  await peers(bob, 'alice', `bob's page to show alice (${label})`);

  // Closing bob's context clears him from alice's awareness.
  await bob.page.context().close();
  await peers(alice, '', "bob's awareness to be cleared at alice");
  assert.deepEqual(alice.errors, []);
  assert.deepEqual(bob.errors, []);
  await alice.page.context().close();
});
