// The Hocuspocus provider (v4) against two lockstep nodes sharing Redis and Postgres: two
// documents multiplexed on one socket per client, edits converge across nodes (and with
// y-websocket clients of the same documents), every edit is acknowledged (`unsyncedChanges`
// back to 0), a viewer is told `readonly` and its edits go nowhere, a document without a role
// is refused on a socket that keeps serving the others, and awareness crosses nodes.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import * as Y from 'yjs';
import WebSocket from 'ws';
import { HocuspocusProvider, HocuspocusProviderWebsocket } from '@hocuspocus/provider';
import { Cluster, waitFor } from './harness.mjs';
import { close, connect, synced } from './clients.mjs';

const EDITOR = { 'scene:*': 'editor' };
/** A map's content with sorted keys: clients may hold the same entries in another order. */
const mapJson = (d) => JSON.stringify(Object.entries(d.map.toJSON()).sort(([x], [y]) => (x < y ? -1 : 1)));
const VIEWER = { 'scene:*': 'viewer' };

/** One socket to `node`, carrying one provider per document name. */
function hocuspocusClient(node, token, names, cleanups, providerOptions = {}) {
  const socket = new HocuspocusProviderWebsocket({ url: `${node.ws}/v1/hocuspocus`, WebSocketPolyfill: WebSocket });
  const docs = {};
  for (const name of names) {
    const document = new Y.Doc();
    const provider = new HocuspocusProvider({ websocketProvider: socket, name, document, token, ...providerOptions });
    const d = { document, provider, scopes: [], failures: [], closes: 0 };
    provider.on('authenticated', ({ scope }) => d.scopes.push(scope));
    provider.on('authenticationFailed', ({ reason }) => d.failures.push(reason));
    provider.on('close', () => { d.closes += 1; });
    provider.attach(); // a shared socket is not managed by the provider: attach explicitly
    Object.assign(d, { text: document.getText('text'), map: document.getMap('map') });
    docs[name] = d;
  }
  const disconnects = [];
  socket.on('disconnect', ({ event }) => disconnects.push(event?.code));
  cleanups.push(() => {
    for (const d of Object.values(docs)) { d.provider.destroy(); d.document.destroy(); }
    socket.destroy();
  });
  return { socket, docs, disconnects };
}

describe('Hocuspocus providers on two nodes', () => {
  let cluster;
  let n0;
  let n1;
  const cleanups = [];

  before(async () => {
    cluster = await Cluster.start({ nodes: 2, postgres: true });
    [n0, n1] = cluster.nodes;
  });

  after(async () => {
    for (const f of cleanups) f();
    await cluster?.cleanup();
  });

  test('two documents on one socket converge across two nodes; a viewer is told readonly', async () => {
    const names = ['scene:10', 'scene:11'];
    const a = hocuspocusClient(n0, cluster.token('alice', EDITOR), names, cleanups);
    const b = hocuspocusClient(n1, cluster.token('bob', EDITOR), names, cleanups);
    const v = hocuspocusClient(n1, cluster.token('vera', VIEWER), names, cleanups);

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
          mapJson(a.docs[name]) === mapJson(b.docs[name]);
      }, `${name} to converge`).catch((e) => {
        const show = (c) => `${c.docs[name].text} ${mapJson(c.docs[name])} unsynced ${c.docs[name].provider.unsyncedChanges}`;
        throw new Error(`${e.message}\nalice ${show(a)}\nbob   ${show(b)}\nvera  ${show(v)}\n${cluster.logs()}`);
      });
    }
    // The documents stayed apart although they share sockets.
    assert.ok(!a.docs['scene:10'].text.toString().includes('scene:11'));
    assert.ok(!a.docs['scene:11'].text.toString().includes('scene:10'));

    // Every edit was acknowledged once it was in the log: nothing unsynced on the writers.
    for (const c of [a, b]) {
      for (const name of names) {
        await waitFor(() => c.docs[name].provider.unsyncedChanges === 0, `${name} acknowledged`);
      }
    }

    // The viewer's edit is refused: a later editor edit arrives, the viewer's never does, and
    // the viewer's provider keeps counting it as unsynced.
    v.docs['scene:10'].text.insert(0, 'VIEWER ');
    a.docs['scene:10'].text.insert(a.docs['scene:10'].text.length, '/fence');
    await waitFor(() => b.docs['scene:10'].text.toString().endsWith('/fence'), 'the fence at bob');
    assert.ok(!b.docs['scene:10'].text.toString().includes('VIEWER'));
    assert.ok(v.docs['scene:10'].provider.hasUnsyncedChanges, 'the viewer still has its edit unsynced');

    // A y-websocket client of the same document, on the other node, sees the same text.
    const y = connect(n0.ws, cluster.token('yuri', EDITOR), { room: 'scene:11', name: 'yuri' });
    cleanups.push(() => close(y));
    await synced(y);
    await waitFor(() => y.text.toString() === b.docs['scene:11'].text.toString(), 'the y-websocket client to agree');
    y.text.insert(0, 'from y-websocket. ');
    await waitFor(() => a.docs['scene:11'].text.toString().startsWith('from y-websocket. '), 'the Hocuspocus client to see it');
    assert.deepEqual([...a.disconnects, ...b.disconnects, ...v.disconnects], [], 'no socket was closed');
  });

  test('a document without a role is refused; the socket keeps serving the others', async () => {
    const token = cluster.token('mia', { 'scene:20': 'editor' });
    const m = hocuspocusClient(n0, token, ['scene:20', 'scene:21', 'not a name'], cleanups);
    const other = hocuspocusClient(n1, cluster.token('otto', EDITOR), ['scene:20'], cleanups);
    await waitFor(() => m.docs['scene:20'].provider.isSynced, 'scene:20 synced');
    await waitFor(() => m.docs['scene:21'].failures.length === 1, 'scene:21 refused');
    await waitFor(() => m.docs['not a name'].failures.length === 1, 'the bad name refused');
    assert.deepEqual(m.docs['scene:21'].failures, ['no role in this room']);
    assert.match(m.docs['not a name'].failures[0], /^bad document name/);
    assert.equal(m.docs['scene:21'].provider.isAuthenticated, false);

    await waitFor(() => other.docs['scene:20'].provider.isSynced, 'otto synced');
    m.docs['scene:20'].text.insert(0, 'mia was here');
    await waitFor(() => other.docs['scene:20'].text.toString() === 'mia was here', 'the edit across nodes');
    // The refused document's local edit goes nowhere and does not break the socket.
    m.docs['scene:21'].text.insert(0, 'nope');
    m.docs['scene:20'].text.insert(0, '!');
    await waitFor(() => other.docs['scene:20'].text.toString() === '!mia was here', 'a later edit');
    assert.deepEqual(m.disconnects, []);
  });

  test('an idle provider without awareness is kept connected by the server\'s Ping', async () => {
    // Without awareness a provider sends nothing and, against a server that says nothing,
    // closes its socket after 30 s of silence (`messageReconnectTimeout`).
    const i = hocuspocusClient(n1, cluster.token('ida', EDITOR), ['scene:40'], cleanups, { awareness: null });
    await waitFor(() => i.docs['scene:40'].provider.isSynced, 'synced');
    const since = Date.now();
    await new Promise((r) => setTimeout(r, 36_000));
    assert.deepEqual(i.disconnects, [], `no disconnect in ${Date.now() - since} ms`);
    assert.ok(Date.now() - i.socket.lastMessageReceived < 16_000, 'a message (Ping) within the last 15 s');
    assert.equal(i.docs['scene:40'].closes, 0);
  });

  test('awareness crosses nodes and is cleared when a provider detaches', async () => {
    const [name] = ['scene:30'];
    const p = hocuspocusClient(n0, cluster.token('pia', EDITOR), [name], cleanups);
    const q = hocuspocusClient(n1, cluster.token('quin', EDITOR), [name], cleanups);
    await waitFor(() => p.docs[name].provider.isSynced && q.docs[name].provider.isSynced, 'both synced');
    p.docs[name].provider.setAwarenessField('user', { name: 'pia' });
    const pid = p.docs[name].document.clientID;
    const seen = () => q.docs[name].provider.awareness.getStates().get(pid)?.user?.name;
    await waitFor(() => seen() === 'pia', "pia's awareness on the other node");
    // Detach sends Close (7) for the document on the still-open socket and clears nothing
    // locally: the server nulls the ids that document announced.
    p.docs[name].provider.detach();
    await waitFor(() => seen() === undefined, "pia's awareness cleared");
  });
});
