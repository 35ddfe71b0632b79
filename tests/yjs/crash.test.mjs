// `kill -9` of a node during an edit burst: the clients behind a load balancer reconnect to the
// surviving node, and every edit that another client had seen (so the gateway had acknowledged
// and relayed it) is in the document a brand-new node loads from Redis afterwards.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { Balancer, Cluster, waitFor } from './harness.mjs';
import { close, connect, peerNames, synced } from './clients.mjs';

const EDITOR = { 'scene:*': 'editor' };
const ROOM = 'scene:1';

let cluster;
let lb;
const open = [];
after(async () => {
  close(...open);
  await lb?.cleanup();
  await cluster?.cleanup();
});

test('kill -9 of a node mid-burst loses no edit another client had seen', async () => {
  cluster = await Cluster.start({ nodes: 2, postgres: true });
  const [n0, n1] = cluster.nodes;
  lb = await new Balancer([n0, n1]).start(); // n0 while it lives, then n1

  const client = (base, sub) => {
    const c = connect(base, cluster.token(sub, EDITOR), { name: sub, room: ROOM });
    open.push(c);
    return c;
  };
  // w1 and w2 write through the balancer (so to n0); o watches from n1.
  const w1 = client(lb.ws, 'writer1');
  const w2 = client(lb.ws, 'writer2');
  const o = client(n1.ws, 'observer');
  for (const c of [w1, w2, o]) await synced(c);
  await waitFor(() => peerNames(o).includes('writer1'), "the observer to see writer1's awareness");

  const seenByObserver = new Set();
  o.doc.getArray('burst').observe((ev) => {
    for (const d of ev.changes.delta) for (const item of d.insert ?? []) seenByObserver.add(item);
  });

  let stop = false;
  let written = { w1: 0, w2: 0 };
  const burst = (w, tag) => (async () => {
    const arr = w.doc.getArray('burst');
    while (!stop) {
      arr.push([`${tag}-${written[tag]++}`]);
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  const bursts = [burst(w1, 'w1'), burst(w2, 'w2')];

  await waitFor(() => seenByObserver.size >= 60, 'the observer to see 60 burst edits', 30000);
  await n0.kill('SIGKILL');
  // w1 dies with the node: its edits now live only in the gateway's log (and in the observer).
  const w1Written = written.w1;
  stop = true; // w2 keeps its unsent edits and sends them again on reconnect
  await Promise.all(bursts);
  close(w1);
  const seenAtKill = new Set(seenByObserver);
  const w1Seen = [...seenAtKill].filter((x) => x.startsWith('w1-'));
  assert.ok(w1Seen.length > 0, 'the observer had seen some of w1\'s edits');
  console.log(`at the kill: w1 wrote ${w1Written}, w2 ${written.w2}; the observer had seen ${seenAtKill.size} (${w1Seen.length} of w1)`);

  // w2 reconnects through the balancer, now to n1.
  await waitFor(() => w2.provider.synced && w2.provider.wsconnected, 'w2 to reconnect elsewhere', 30000);
  assert.ok(w2.closes.length >= 1, 'w2 lost its connection to the killed node');

  // A brand-new node has nothing in memory: what it serves comes from Redis (and Postgres).
  const n2 = await cluster.addNode();
  const fresh = client(n2.ws, 'fresh');
  await synced(fresh);
  const w2All = Array.from({ length: written.w2 }, (_, i) => `w2-${i}`);
  await waitFor(() => {
    const have = new Set(fresh.doc.getArray('burst').toArray());
    return [...seenAtKill, ...w2All].every((x) => have.has(x));
  }, 'the fresh node to serve every seen edit and all of w2\'s', 30000).catch((e) => {
    const have = new Set(fresh.doc.getArray('burst').toArray());
    const missing = [...seenAtKill, ...w2All].filter((x) => !have.has(x));
    throw new Error(`${e.message}; missing ${missing.length}: ${missing.slice(0, 20).join(' ')}\n${cluster.logs()}`);
  });

  // And everybody still connected converges on one document.
  await waitFor(() => {
    const f = JSON.stringify(fresh.doc.getArray('burst').toArray());
    return f === JSON.stringify(o.doc.getArray('burst').toArray()) && f === JSON.stringify(w2.doc.getArray('burst').toArray());
  }, 'fresh, observer and w2 to converge', 30000);
  const final = fresh.doc.getArray('burst').toArray();
  assert.equal(new Set(final).size, final.length, 'no edit applied twice');

  // writer1 died with its node, which could send no null awareness for it: its state goes when
  // it expires (30 s after its last update: the y-protocols timeout), not at once.
  const t0 = Date.now();
  await waitFor(() => !peerNames(o).includes('writer1'), "writer1's awareness to expire at the observer", 90000, 200);
  console.log(`writer1's awareness was gone at the observer ${Date.now() - t0} ms after the check began`);
  console.log(`after: ${final.length} edits in the document (${final.filter((x) => x.startsWith('w1-')).length} of w1's ${w1Written})`);
});
