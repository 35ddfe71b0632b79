// The Hocuspocus provider (v4) against two lockstep nodes: two documents multiplexed on one
// socket per client, edits converge across nodes, and a viewer is told `readonly`.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import * as Y from 'yjs';
import WebSocket from 'ws';
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider';
import { Cluster, waitFor } from './harness.mjs';

// `GET /v1/hocuspocus` is issue 11's second endpoint; the branch this was written against
// (yjs-core, 2026-12-07) does not serve it yet, so the test is skipped with that reason.
// LOCKSTEP_YJS_HOCUSPOCUS=1 runs it (once the endpoint exists, drop the skip).
const SKIP = process.env.LOCKSTEP_YJS_HOCUSPOCUS === '1'
  ? false
  : 'GET /v1/hocuspocus is not built yet (issue 11, branch yjs-core); LOCKSTEP_YJS_HOCUSPOCUS=1 runs it';

let cluster;
const cleanups = [];
after(async () => {
  for (const f of cleanups) f();
  await cluster?.cleanup();
});

/** One socket to `node`, carrying one provider per document name. */
function hocuspocusClient(node, token, names) {
  const socket = new HocuspocusProviderWebsocket({ url: `${node.ws}/v1/hocuspocus`, WebSocketPolyfill: WebSocket });
  const docs = {};
  for (const name of names) {
    const document = new Y.Doc();
    const provider = new HocuspocusProvider({ websocketProvider: socket, name, document, token });
    provider.attach(); // a shared socket is not managed by the provider: attach explicitly
    const scopes = [];
    provider.on('authenticated', ({ scope }) => scopes.push(scope));
    docs[name] = { document, provider, scopes, text: document.getText('text'), map: document.getMap('map') };
  }
  cleanups.push(() => {
    for (const d of Object.values(docs)) { d.provider.destroy(); d.document.destroy(); }
    socket.destroy();
  });
  return { socket, docs };
}

test('Hocuspocus: two documents on one socket converge across two nodes', { skip: SKIP }, async () => {
  cluster = await Cluster.start({ nodes: 2, postgres: true });
  const [n0, n1] = cluster.nodes;
  const names = ['scene:10', 'scene:11'];
  const editor = { 'scene:*': 'editor' };
  const a = hocuspocusClient(n0, cluster.token('alice', editor), names);
  const b = hocuspocusClient(n1, cluster.token('bob', editor), names);
  const v = hocuspocusClient(n1, cluster.token('vera', { 'scene:*': 'viewer' }), names);

  for (const c of [a, b, v]) {
    for (const name of names) await waitFor(() => c.docs[name].provider.isSynced, `${name} synced`);
  }
  for (const name of names) {
    assert.deepEqual(a.docs[name].scopes, ['read-write']);
    assert.deepEqual(v.docs[name].scopes, ['readonly'], 'a viewer is told readonly');
  }

  for (const [i, name] of names.entries()) {
    a.docs[name].text.insert(0, `alice in ${name}. `);
    b.docs[name].text.insert(0, `bob in ${name}. `);
    a.docs[name].map.set('n', i);
    b.docs[name].map.set(`from-bob-${i}`, true);
  }
  for (const name of names) {
    await waitFor(() => {
      const t = a.docs[name].text.toString();
      return t === b.docs[name].text.toString() && t === v.docs[name].text.toString() &&
        t.includes('alice') && t.includes('bob') &&
        JSON.stringify(a.docs[name].map.toJSON()) === JSON.stringify(b.docs[name].map.toJSON());
    }, `${name} to converge`).catch((e) => { throw new Error(`${e.message}\n${cluster.logs()}`); });
  }
  // The documents stayed apart although they share sockets.
  assert.ok(!a.docs['scene:10'].text.toString().includes('scene:11'));
  assert.ok(!a.docs['scene:11'].text.toString().includes('scene:10'));

  // The viewer's edit is refused: a later editor edit arrives, the viewer's never does.
  v.docs['scene:10'].text.insert(0, 'VIEWER ');
  a.docs['scene:10'].text.insert(a.docs['scene:10'].text.length, '/fence');
  await waitFor(() => b.docs['scene:10'].text.toString().endsWith('/fence'), 'the fence at bob');
  assert.ok(!b.docs['scene:10'].text.toString().includes('VIEWER'));
});
