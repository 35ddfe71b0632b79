// Scenario 1: D documents × E editors on the nodes (editor e of a document on node e mod N),
// each typing R updates/s (an insert of `chars` characters at a random place in its own
// Y.Text). Measured: for every update typed inside the window, the time from the local edit to
// its arrival at each other editor of the document (split same node / other node), and to its
// echo at the writer (the server acknowledges an update only once it is in the log).
//
// How an arrival is recognised without integrating it: every received update is parsed with
// `Y.parseUpdateMeta` (which client ids and clock ranges it carries; the server merges the
// updates of its 5 ms batch window into one), and each insert's start clock is looked up in
// the send times of its writer. Editors do not apply each other's updates (`--apply` makes
// them): a typist's own updates stay valid, and the driver's CPU stays for the sockets.
import { fork } from 'node:child_process';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { Histogram, RawClient, Y, cpuSeconds, ramp, round, sleep, token, yjsUrl } from './proto.mjs';

export const LATENCY_DEFAULTS = {
  urls: '', secret: '', docs: 1, editors: 50, rate: 2, chars: 8, warmup: 5, duration: 20,
  drain: 3, procs: 1, pids: '', connect_rate: 200, prefix: 'bench', apply: false,
};

/** One process's share: the documents `docIds`. `waitGo()` resolves to the wall-clock start. */
async function worker(o, docIds, waitGo, onReady = () => {}) {
  const urls = o.urls.split(',');
  const h = { same: new Histogram(), cross: new Histogram(), ack: new Histogram() };
  const counts = { sent: 0, expected: 0, delivered: 0, unexpected_closes: 0 };
  let window = [Infinity, -Infinity];
  const editors = [];
  for (const d of docIds) {
    const sends = new Map(); // writer client id -> Map(start clock -> {t, node, measured})
    for (let e = 0; e < o.editors; e++) editors.push({ d, e, node: e % urls.length, sends });
  }
  const onUpdate = (ed) => (u) => {
    const now = performance.now();
    if (o.apply) Y.applyUpdate(ed.doc, u, 'remote');
    const meta = Y.parseUpdateMeta(u);
    for (const [client, from] of meta.from) {
      const rec = ed.sends.get(client);
      if (!rec) continue;
      const to = meta.to.get(client);
      for (let c = from; c < to; c += o.chars) {
        const s = rec.get(c);
        if (!s?.measured) continue;
        if (client === ed.id) h.ack.add(now - s.t);
        else {
          (s.node === ed.node ? h.same : h.cross).add(now - s.t);
          counts.delivered++;
        }
      }
    }
  };
  await ramp(editors.length, o.connect_rate, async (i) => {
    const ed = editors[i];
    ed.doc = new Y.Doc();
    ed.id = ed.doc.clientID;
    ed.text = ed.doc.getText('text');
    ed.sends.set(ed.id, new Map());
    const url = yjsUrl(urls[ed.node], `${o.prefix}:${ed.d}`, token(o.secret, `editor-${ed.d}-${ed.e}`));
    ed.client = new RawClient(url, { onUpdate: onUpdate(ed), onStep2: (u) => o.apply && Y.applyUpdate(ed.doc, u) });
    ed.doc.on('update', (u, origin) => origin !== 'remote' && ed.client.send(u));
    await ed.client.synced;
    ed.client.closed.then(() => { if (!ed.closing) counts.unexpected_closes++; });
  });
  onReady();
  const go = await waitGo();
  const offset = Date.now() - performance.now();
  window = [go + o.warmup * 1000 - offset, go + (o.warmup + o.duration) * 1000 - offset];
  const filler = 'abcdefghijklmnopqrstuvwxyz'.repeat(Math.ceil(o.chars / 26)).slice(0, o.chars);
  const every = 1000 / o.rate;
  const type = (ed) => {
    const t = performance.now();
    if (t > window[1]) return;
    const clock = Y.getState(ed.doc.store, ed.id);
    const measured = t >= window[0];
    ed.sends.get(ed.id).set(clock, { t, node: ed.node, measured });
    if (measured) {
      counts.sent++;
      counts.expected += o.editors - 1;
    }
    ed.text.insert(Math.floor(Math.random() * (ed.text.length + 1)), filler);
  };
  await sleep(Math.max(0, go - Date.now()));
  for (const ed of editors) {
    // A random phase, then a fixed period: typists do not press keys in step.
    ed.timer = setTimeout(() => {
      type(ed);
      ed.timer = setInterval(() => type(ed), every);
    }, Math.random() * every);
  }
  await sleep(window[0] - performance.now());
  const cpu0 = process.cpuUsage();
  await sleep(window[1] - performance.now());
  const cpu = process.cpuUsage(cpu0);
  for (const ed of editors) {
    clearTimeout(ed.timer);
    clearInterval(ed.timer);
  }
  await sleep(o.drain * 1000);
  await Promise.all(editors.map((ed) => { ed.closing = true; return ed.client.close(); }));
  return {
    hist: { same: h.same.toJSON(), cross: h.cross.toJSON(), ack: h.ack.toJSON() },
    counts,
    cpu_s: (cpu.user + cpu.system) / 1e6,
  };
}

/** Runs the scenario (forking `procs` workers when > 1) and returns one JSON-able result. */
export async function latency(o) {
  const pids = o.pids ? o.pids.split(',').map(Number) : [];
  const results = [];
  const cpu = {};
  const readCpu = () => pids.map((p) => { try { return cpuSeconds(p); } catch { return 0; } });
  const measureServers = async (go) => {
    await sleep(go + o.warmup * 1000 - Date.now());
    const c0 = readCpu();
    await sleep(go + (o.warmup + o.duration) * 1000 - Date.now());
    cpu.servers = readCpu().map((c, i) => round((c - c0[i]) / o.duration));
  };
  if (o.procs <= 1) {
    let readyNow;
    let goNow;
    const ready = new Promise((r) => { readyNow = r; });
    const goP = new Promise((r) => { goNow = r; });
    const run = worker(o, [...Array(o.docs).keys()], () => goP, () => readyNow());
    await Promise.race([ready, run]);
    const go = Date.now() + 500;
    goNow(go);
    const serverCpu = measureServers(go);
    results.push(await run);
    await serverCpu;
  } else {
    const children = [];
    for (let w = 0; w < o.procs; w++) {
      const docIds = [...Array(o.docs).keys()].filter((d) => d % o.procs === w);
      const child = fork(fileURLToPath(import.meta.url), ['--worker', JSON.stringify({ o, docIds })], { stdio: 'inherit' });
      children.push({ child, ready: new Promise((r) => child.once('message', r)), done: new Promise((r) => child.on('message', (m) => m.done && r(m.done))) });
    }
    await Promise.all(children.map((c) => c.ready));
    const go = Date.now() + 500;
    for (const c of children) c.child.send({ go });
    const serverCpu = measureServers(go);
    for (const c of children) results.push(await c.done);
    await serverCpu;
  }
  return summarise(o, results, cpu);
}

function summarise(o, results, cpu) {
  const merged = { same: new Histogram(), cross: new Histogram(), ack: new Histogram(), all: new Histogram() };
  const counts = { sent: 0, expected: 0, delivered: 0, unexpected_closes: 0 };
  let driverCpu = 0;
  for (const r of results) {
    for (const k of ['same', 'cross', 'ack']) merged[k].merge(r.hist[k]);
    merged.all.merge(r.hist.same);
    merged.all.merge(r.hist.cross);
    for (const k of Object.keys(counts)) counts[k] += r.counts[k];
    driverCpu += r.cpu_s;
  }
  return {
    scenario: 'latency',
    docs: o.docs, editors_per_doc: o.editors, nodes: o.urls.split(',').length, rate_per_editor: o.rate,
    duration_s: o.duration, driver_procs: o.procs, apply: o.apply,
    updates_per_s: round(counts.sent / o.duration, 1),
    deliveries_per_s: round(counts.delivered / o.duration, 0),
    delivery_ratio: round(counts.delivered / Math.max(1, counts.expected), 4),
    unexpected_closes: counts.unexpected_closes,
    round_trip: merged.all.summary(),
    same_node: merged.same.summary(),
    other_node: merged.cross.summary(),
    writer_ack: merged.ack.summary(),
    driver_cpu_cores: round(driverCpu / o.duration),
    server_cpu_cores: cpu.servers ?? null,
  };
}

// A forked worker: connects its documents, says ready, waits for `go`, reports.
if (process.argv[2] === '--worker') {
  const { o, docIds } = JSON.parse(process.argv[3]);
  const go = new Promise((r) => process.on('message', (m) => m.go && r(m.go)));
  const res = await worker(o, docIds, () => go, () => process.send({ ready: true }));
  process.send({ done: res }, () => process.exit(0));
}
