// The Yjs demo page the binary serves itself (GET /yjs and its embedded bundle /yjs-demo.js,
// src/http/demo/): headless Chromium contexts open it on real nodes and type into its textarea
// with the keyboard. Two nodes sharing Redis: each context sees the other's text and name, a
// remote insert before the caret does not move where the local typing goes, and a late joiner
// sees the whole text; without Postgres, a page on a cold node still sees text typed before the
// compactor's age limit. One embedded node in dev mode: the page gets its own dev tokens.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { Cluster } from './harness.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SKIP = existsSync(CHROMIUM) ? false : `no Chromium at ${CHROMIUM} (apt-get install -y chromium, or set CHROMIUM_PATH)`;
const WAIT = { timeout: 20000 };

const clusters = [];
let browser;
after(async () => {
  await browser?.close();
  for (const c of clusters) await c.cleanup();
});

async function start(opts) {
  const c = await Cluster.start(opts);
  clusters.push(c);
  return c;
}

async function launch() {
  browser ??= await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  return browser;
}

/** Opens /yjs on `node` in a fresh browser context and waits until its provider synced. */
async function open(cluster, node, query) {
  const ctx = await (await launch()).newContext();
  const page = await ctx.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await page.goto(`${node.http}/yjs?${new URLSearchParams(query)}`);
  await page.waitForFunction(() => window.yjsDemo?.synced === true, null, WAIT).catch(async (e) => {
    const status = await page.textContent('#status').catch(() => '?');
    throw new Error(`${query.name} never synced (status ${status}; ${errors.join('; ')}): ${e.message}\n${cluster.logs()}`);
  });
  assert.equal(await page.getAttribute('#status', 'data-status'), 'synced');
  return { page, errors, ctx };
}

const textIs = (p, want) => p.page
  .waitForFunction((w) => document.getElementById('text').value === w && window.yjsDemo.text() === w, want, WAIT)
  .catch(async (e) => { throw new Error(`textarea shows ${JSON.stringify(await p.page.inputValue('#text'))}, want ${JSON.stringify(want)} (${e.message})`); });

/** The names in the page's awareness list, in its order ("(you)" marks the page's own user). */
const listed = (p) => p.page.$$eval('#peers li', (lis) => lis.map((li) => li.dataset.name + (li.querySelector('.you') ? '*' : '')));
const peersAre = (p, want) => p.page
  .waitForFunction((w) => JSON.stringify([...document.querySelectorAll('#peers li')]
    .map((li) => li.dataset.name + (li.querySelector('.you') ? '*' : ''))) === w, JSON.stringify(want), WAIT)
  .catch(async (e) => { throw new Error(`awareness list ${JSON.stringify(await listed(p))}, want ${JSON.stringify(want)} (${e.message})`); });

test('the binary serves /yjs and its embedded bundle, with an ETag', async () => {
  const c = await start({ nodes: 1, redis: false });
  const node = c.nodes[0];
  const page = await fetch(`${node.http}/yjs`);
  assert.equal(page.status, 200);
  assert.match(page.headers.get('content-type'), /^text\/html/);
  assert.equal(page.headers.get('cache-control'), 'no-cache');
  const html = await page.text();
  assert.equal(html, readFileSync(path.join(ROOT, 'src/http/demo/yjs.html'), 'utf8'));
  assert.match(html, /<script type="module" src="\/yjs-demo.js">/);

  const js = await fetch(`${node.http}/yjs-demo.js`);
  assert.equal(js.status, 200);
  assert.equal(js.headers.get('content-type'), 'text/javascript; charset=utf-8');
  assert.equal(js.headers.get('cache-control'), 'no-cache');
  const etag = js.headers.get('etag');
  assert.match(etag, /^"[0-9a-f]{16}"$/);
  assert.equal(await js.text(), readFileSync(path.join(ROOT, 'src/http/demo/yjs-demo.js'), 'utf8'));
  const again = await fetch(`${node.http}/yjs-demo.js`, { headers: { 'if-none-match': etag } });
  assert.equal(again.status, 304);
  // Not the SDK bundle's ETag: a browser must not take one for the other.
  const sdk = await fetch(`${node.http}/lockstep-client.js`);
  assert.notEqual(sdk.headers.get('etag'), etag);
  // The main demo links to it.
  assert.match(await (await fetch(`${node.http}/`)).text(), /href="\/yjs"/);
  await c.cleanup();
});

test('two contexts on two nodes type into /yjs and see each other; a late joiner sees it all', { skip: SKIP }, async () => {
  const c = await start({ nodes: 2 });
  const [n0, n1] = c.nodes;
  const room = 'scene:demo';
  const q = (name) => ({ token: c.token(name, { 'scene:*': 'editor' }), name, room });
  const alice = await open(c, n0, q('alice'));
  const bob = await open(c, n1, q('bob'));
  for (const [p, node] of [[alice, n0], [bob, n1]]) {
    assert.equal(await p.page.textContent('#node'), `node ${node.id} · 127.0.0.1:${node.port}`);
  }

  await peersAre(alice, ['alice*', 'bob']);
  await peersAre(bob, ['bob*', 'alice']);

  // Real typing, one after the other.
  await alice.page.locator('#text').pressSequentially('world');
  await textIs(bob, 'world');
  // Alice's caret sits inside the text ("wor|ld") when bob types at the very start: the page
  // must move her caret with the text (setting a textarea's value alone puts it at the end),
  // so her next keystroke lands where she left off.
  await alice.page.locator('#text').press('ArrowLeft');
  await alice.page.locator('#text').press('ArrowLeft');
  await bob.page.locator('#text').press('Control+Home');
  await bob.page.locator('#text').pressSequentially('hello ');
  await textIs(alice, 'hello world');
  await alice.page.locator('#text').pressSequentially('-');
  for (const p of [alice, bob]) await textIs(p, 'hello wor-ld');
  await bob.page.locator('#text').press('End');
  await bob.page.locator('#text').pressSequentially('!');
  for (const p of [alice, bob]) await textIs(p, 'hello wor-ld!');

  // A third context on node 0, after the edits: the whole text, and everyone in the list.
  const carol = await open(c, n0, q('carol'));
  await textIs(carol, 'hello wor-ld!');
  await peersAre(carol, ['carol*', 'alice', 'bob']);
  await peersAre(bob, ['bob*', 'alice', 'carol']);

  // A new name is an awareness change, seen on the other node without a reconnect.
  await alice.page.locator('#name').fill('alice2');
  await peersAre(bob, ['bob*', 'alice2', 'carol']);

  // Closing a context takes its user out of the others' lists.
  await carol.ctx.close();
  await peersAre(bob, ['bob*', 'alice2']);
  for (const p of [alice, bob, carol]) assert.deepEqual(p.errors, []);
  await alice.ctx.close();
  await bob.ctx.close();
  await c.cleanup();
});

test('Redis without Postgres (scripts/local-cluster.sh): a page opened on a cold node past the compaction age sees the text', { skip: SKIP }, async () => {
  // The compactor's files are per node; a node that compacted the shared log into its own file
  // would trim entries the other node then cannot load. Nothing may be trimmed here.
  // A compaction age of 1 s instead of 30 s: the wait below is past it without taking 35 s.
  const c = await start({ nodes: 2, nodeEnv: { LOCKSTEP_YJS_COMPACT_MAX_AGE: '1s' } });
  const [n0, n1] = c.nodes;
  const q = (name) => ({ token: c.token(name, { 'scene:*': 'editor' }), name, room: 'scene:late' });
  const alice = await open(c, n0, q('alice'));
  await alice.page.locator('#text').pressSequentially('typed on node 0');
  await new Promise((r) => setTimeout(r, 4000)); // past the compactor's max_age (1 s, checked every 1 s)
  const bob = await open(c, n1, q('bob'));
  await textIs(bob, 'typed on node 0');
  await bob.page.locator('#text').press('End');
  await bob.page.locator('#text').pressSequentially(', read on node 1');
  await textIs(alice, 'typed on node 0, read on node 1');
  for (const p of [alice, bob]) assert.deepEqual(p.errors, []);
  await alice.ctx.close();
  await bob.ctx.close();
  await c.cleanup();
});

test('embedded dev mode: /yjs mints its own dev tokens and two tabs share the text', { skip: SKIP }, async () => {
  // No Redis, no JWT key: the node is in dev mode, as after `cargo run --release`.
  const c = await start({ nodes: 1, redis: false, nodeEnv: { LOCKSTEP_JWT_SECRET: '' } });
  const [n0] = c.nodes;
  const dave = await open(c, n0, { name: 'dave' });
  const erin = await open(c, n0, { name: 'erin', room: 'scene:demo' });
  assert.equal(await dave.page.inputValue('#room'), 'scene:demo');
  await dave.page.locator('#text').pressSequentially('dev mode');
  await textIs(erin, 'dev mode');
  await erin.page.locator('#text').press('End');
  await erin.page.locator('#text').pressSequentially(' works');
  await textIs(dave, 'dev mode works');
  await peersAre(dave, ['dave*', 'erin']);

  // Another document from the form: a fresh, empty text with only this tab in it.
  await erin.page.locator('#room').fill('scene:other');
  await erin.page.locator('[data-testid=open]').click();
  await textIs(erin, '');
  await erin.page.waitForFunction(() => window.yjsDemo.synced && new URL(location.href).searchParams.get('room') === 'scene:other', null, WAIT);
  await peersAre(erin, ['erin*']);
  await peersAre(dave, ['dave*']);
  for (const p of [dave, erin]) assert.deepEqual(p.errors, []);
  await dave.ctx.close();
  await erin.ctx.close();
  await c.cleanup();
});
