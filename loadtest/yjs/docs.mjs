// Scenarios 2–4: memory per loaded document and per connection, building large documents
// (and log tails to put under them), timing a cold join with the real y-websocket provider,
// and generating a long update log for the compactor.
import { writeFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import {
  RawClient, WebSocket, WebsocketProvider, Y, cpuSeconds, ramp, round, rssBytes, sleep, token, yjsUrl,
} from './proto.mjs';

export const MEMORY_DEFAULTS = {
  url: '', secret: '', docs: 1000, clients: 2, updates: 10, chars: 100, pid: 0, connect_rate: 500,
  settle: 5, prefix: 'mem',
};

/**
 * `docs` documents on one node. Phase 1: one client per document connects and writes
 * `updates` inserts of `chars` characters (a "document" is that text); phase 2: `clients - 1`
 * more readers per document connect. The node's RSS after each phase (and `settle` seconds of
 * quiet) gives the cost of a loaded document with one connection, and of one more connection.
 */
export async function memory(o) {
  const rss = [rssBytes(o.pid)];
  const cpu = [cpuSeconds(o.pid)];
  const refused = {};
  const refuse = (code) => { refused[code] = (refused[code] ?? 0) + 1; };
  const filler = 'lorem ipsum dolor sit amet '.repeat(Math.ceil(o.chars / 27)).slice(0, o.chars);
  let stateBytes = 0;
  const t0 = performance.now();
  const writers = await ramp(o.docs, o.connect_rate, async (i) => {
    const doc = new Y.Doc();
    let acked = 0;
    let want = Infinity;
    let done;
    const ackedAll = new Promise((r) => { done = r; });
    const c = new RawClient(yjsUrl(o.url, `${o.prefix}:${i}`, token(o.secret, `writer-${i}`)), {
      onUpdate: (u) => {
        const to = Y.parseUpdateMeta(u).to.get(doc.clientID) ?? 0;
        acked = Math.max(acked, to);
        if (acked >= want) done();
      },
    });
    try {
      await c.synced;
    } catch {
      refuse(c.closeCode ?? 'error');
      return null;
    }
    doc.on('update', (u) => c.send(u));
    const text = doc.getText('text');
    for (let k = 0; k < o.updates; k++) text.insert(Math.floor(Math.random() * (text.length + 1)), filler);
    want = Y.getState(doc.store, doc.clientID);
    if (acked >= want) done();
    await Promise.race([ackedAll, sleep(30000)]);
    if (i === 0) stateBytes = Y.encodeStateAsUpdate(doc).length;
    doc.destroy();
    return c;
  });
  const phase1S = (performance.now() - t0) / 1000;
  await sleep(o.settle * 1000);
  rss.push(rssBytes(o.pid));
  cpu.push(cpuSeconds(o.pid));
  const t1 = performance.now();
  const readers = (await ramp(o.docs * (o.clients - 1), o.connect_rate, async (j) => {
    const i = j % o.docs;
    const c = new RawClient(yjsUrl(o.url, `${o.prefix}:${i}`, token(o.secret, `reader-${j}`)));
    try {
      await c.synced;
      return c;
    } catch {
      refuse(c.closeCode ?? 'error');
      return null;
    }
  }));
  const phase2S = (performance.now() - t1) / 1000;
  cpu.push(cpuSeconds(o.pid));
  await sleep(o.settle * 1000);
  rss.push(rssBytes(o.pid));
  // Nothing is typed now: what the node spends is the cost of holding the documents open.
  const idleCores = (cpuSeconds(o.pid) - cpu[2]) / o.settle;
  const ok1 = writers.filter(Boolean).length;
  const ok2 = readers.filter(Boolean).length;
  await Promise.all([...writers, ...readers].filter(Boolean).map((c) => c.close()));
  return {
    scenario: 'memory',
    docs: o.docs, clients_per_doc: o.clients, doc_text_chars: o.updates * o.chars, doc_updates: o.updates,
    doc_state_bytes: stateBytes,
    loaded_docs: ok1, extra_connections: ok2, refused,
    rss_base_mb: round(rss[0] / 1e6, 1), rss_docs_mb: round(rss[1] / 1e6, 1), rss_all_mb: round(rss[2] / 1e6, 1),
    bytes_per_doc_with_1_conn: ok1 ? Math.round((rss[1] - rss[0]) / ok1) : null,
    bytes_per_extra_conn: ok2 ? Math.round((rss[2] - rss[1]) / ok2) : null,
    phase1_s: round(phase1S, 1), phase2_s: round(phase2S, 1),
    server_cpu_s_phase1: round(cpu[1] - cpu[0], 1), server_cpu_s_phase2: round(cpu[2] - cpu[1], 1),
    server_idle_cpu_cores: round(idleCores),
  };
}

export const BUILD_DEFAULTS = {
  url: '', secret: '', doc: 'big:1', target_bytes: 1_000_000, writers: 4, tails: 0, tail_entries: 10000,
  out: '', prefix: 'lockstep:',
};

/** A random edit: mostly inserts of 20–2,000 characters, some deletes and map entries. */
function edit(doc, n) {
  const text = doc.getText('text');
  const r = Math.random();
  if (r < 0.1 && text.length > 500) {
    const at = Math.floor(Math.random() * (text.length - 200));
    text.delete(at, 1 + Math.floor(Math.random() * 200));
  } else if (r < 0.2) {
    doc.getMap('meta').set(`k${n % 500}`, { n, at: Date.now(), tags: ['a', 'b', String(n)] });
  } else {
    const len = 20 + Math.floor(Math.random() * 1980);
    const s = Math.random().toString(36).repeat(Math.ceil(len / 10)).slice(0, len);
    text.insert(Math.floor(Math.random() * (text.length + 1)), s);
  }
}

/** RESP for `XADD <log key of doc> * u <update>`, what the node's own append script writes. */
function xadd(prefix, doc, update) {
  const arg = (b) => Buffer.concat([Buffer.from(`$${b.length}\r\n`), Buffer.from(b), Buffer.from('\r\n')]);
  return Buffer.concat([Buffer.from('*5\r\n'), ...['XADD', `${prefix}yd:{${doc}}:log`, '*', 'u'].map(arg), arg(update)]);
}

/**
 * Builds document `doc` through the node with `writers` concurrent editors (each integrates the
 * others' updates, one update in flight each) until its encoded state reaches `target_bytes`.
 * Then, with `tails` > 0, makes that many tails of `tail_entries` small edits each on top of
 * it, as RESP files `<out>.tail<k>.resp` (one XADD per edit) for `redis-cli --pipe`.
 * Writes `<out>` (JSON: sizes and the text length after each tail).
 */
export async function build(o) {
  const t0 = performance.now();
  const ws = [];
  for (let w = 0; w < o.writers; w++) {
    const doc = new Y.Doc();
    const st = { doc, acked: 0, wake: null };
    st.client = new RawClient(yjsUrl(o.url, o.doc, token(o.secret, `builder-${w}`)), {
      onStep2: (u) => Y.applyUpdate(doc, u, 'remote'),
      onUpdate: (u) => {
        Y.applyUpdate(doc, u, 'remote');
        st.acked = Math.max(st.acked, Y.parseUpdateMeta(u).to.get(doc.clientID) ?? 0);
        st.wake?.();
      },
    });
    doc.on('update', (u, origin) => origin !== 'remote' && st.client.send(u));
    await st.client.synced;
    ws.push(st);
  }
  let n = 0;
  let size = 0;
  let updates = 0;
  let done = false;
  let own = 0;
  await Promise.all(ws.map(async (st) => {
    while (!done) {
      edit(st.doc, n++);
      updates++;
      const want = Y.getState(st.doc.store, st.doc.clientID);
      while (st.acked < want && st.client.closeCode === null) await new Promise((r) => { st.wake = r; });
      if (st.client.closeCode !== null) throw new Error(`builder closed with ${st.client.closeCode}`);
      // Encoding the whole state is the only exact size; every 10th edit of one writer.
      if (st === ws[0] && ++own % 10 === 0) {
        size = Y.encodeStateAsUpdate(st.doc).length;
        if (size >= o.target_bytes) done = true;
      }
    }
  }));
  // Every writer has every update once all have acked their own and seen the rest.
  const expect = () => Y.encodeStateVector(ws[0].doc).toString();
  await sleep(1000);
  const full = ws[0].doc;
  const info = {
    doc: o.doc, updates, state_bytes: Y.encodeStateAsUpdate(full).length,
    text_chars: full.getText('text').length, build_s: round((performance.now() - t0) / 1000, 1),
    writers_agree: ws.every((st) => Y.encodeStateVector(st.doc).toString() === expect()), tails: [],
  };
  await Promise.all(ws.map((st) => st.client.close()));
  for (let k = 0; k < o.tails; k++) {
    const parts = [];
    let bytes = 0;
    const onUpdate = (u) => { parts.push(xadd(o.prefix, o.doc, u)); bytes += u.length; };
    full.on('update', onUpdate);
    const text = full.getText('text');
    for (let i = 0; i < o.tail_entries; i++) {
      // Typing: one to eight characters, now and then a deletion.
      if (i % 10 === 9 && text.length > 10) text.delete(Math.floor(Math.random() * (text.length - 5)), 3);
      else text.insert(Math.floor(Math.random() * (text.length + 1)), 'typing!!'.slice(0, 1 + (i % 8)));
    }
    full.off('update', onUpdate);
    writeFileSync(`${o.out}.tail${k}.resp`, Buffer.concat(parts));
    info.tails.push({ entries: parts.length, update_bytes: bytes, text_chars_after: text.length, state_bytes_after: Y.encodeStateAsUpdate(full).length });
  }
  writeFileSync(o.out, JSON.stringify(info));
  return info;
}

export const JOIN_DEFAULTS = { url: '', secret: '', doc: 'big:1', expect_chars: -1, pid: 0 };

/** A real y-websocket provider joins `doc`: ms from constructing it to its `sync` event. */
export async function join(o) {
  const cpu0 = o.pid ? cpuSeconds(o.pid) : 0;
  const doc = new Y.Doc();
  const t0 = performance.now();
  const provider = new WebsocketProvider(`${o.url.replace(/^http/, 'ws')}/v1/yjs`, o.doc, doc, {
    WebSocketPolyfill: WebSocket, params: { token: token(o.secret, 'joiner') }, disableBc: true,
  });
  const ms = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no sync within 120 s')), 120000);
    provider.on('sync', (s) => { if (s) { clearTimeout(timer); resolve(performance.now() - t0); } });
  });
  const chars = doc.getText('text').length;
  const res = {
    scenario: 'cold_join', doc: o.doc, sync_ms: round(ms, 1), text_chars: chars,
    state_bytes: Y.encodeStateAsUpdate(doc).length, complete: o.expect_chars < 0 || chars === o.expect_chars,
    server_cpu_s: o.pid ? round(cpuSeconds(o.pid) - cpu0, 2) : null,
  };
  provider.destroy();
  doc.destroy();
  return res;
}

export const LOG_DEFAULTS = { doc: 'log:1', clients: 50, entries: 50000, out: '', prefix: 'lockstep:' };

/**
 * `entries` updates from `clients` typists into one document's log as RESP (`<out>.resp`),
 * written while no node has the document loaded: the compactor then meets the whole log at
 * once. Each typist sees the others' text every 50 of its own edits, so the inserts
 * interleave as in a shared session.
 */
export function genLog(o) {
  const hub = new Y.Doc();
  const typists = Array.from({ length: o.clients }, () => new Y.Doc());
  const parts = [];
  let bytes = 0;
  for (let i = 0; i < o.entries; i++) {
    const t = typists[i % o.clients];
    if (Math.floor(i / o.clients) % 50 === 0) Y.applyUpdate(t, Y.encodeStateAsUpdate(hub, Y.encodeStateVector(t)), 'remote');
    const once = (u, origin) => {
      if (origin === 'remote') return;
      parts.push(xadd(o.prefix, o.doc, u));
      bytes += u.length;
      Y.applyUpdate(hub, u, 'remote');
    };
    t.on('update', once);
    const text = t.getText('text');
    text.insert(Math.floor(Math.random() * (text.length + 1)), 'typed..'.slice(0, 1 + (i % 7)));
    t.off('update', once);
  }
  writeFileSync(`${o.out}.resp`, Buffer.concat(parts));
  const info = { doc: o.doc, entries: parts.length, update_bytes: bytes, state_bytes: Y.encodeStateAsUpdate(hub).length, text_chars: hub.getText('text').length };
  writeFileSync(o.out, JSON.stringify(info));
  return info;
}
