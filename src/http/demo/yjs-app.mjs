// The Yjs demo page's script (GET /yjs). Bundled with yjs 13.6 and y-websocket 3.1 into
// yjs-demo.js by scripts/check-demo-bundle.sh (which also checks the committed bundle is what
// this source builds); the binary embeds that bundle and serves it at GET /yjs-demo.js.
//
// One shared <textarea> bound to a Y.Text through a real y-websocket provider on this node's
// /v1/yjs endpoint, the awareness list (who is here: name and colour), the connection status
// and the node it talks to. URL parameters: token (a JWT instead of a dev token), name, room.
// `window.yjsDemo` exposes the provider state for the browser test (tests/yjs/demo.test.mjs).
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const store = window.sessionStorage;
const ENTITY = /^[a-z][a-z0-9_]{0,31}:[A-Za-z0-9._~-]{1,128}$/;
const NAMES = ['Alice', 'Bob', 'Carol', 'Dave', 'Erin', 'Frank', 'Grace', 'Heidi', 'Ivan', 'Judy'];
const remembered = (key, make) => {
  let v = store.getItem(key);
  if (!v) { v = make(); store.setItem(key, v); }
  return v;
};
// One user id per tab (sessionStorage), as on the main demo page: two tabs are two users.
const sub = remembered('lockstep.yjs.sub', () => `u-${Math.random().toString(36).slice(2, 10)}`);

/** A stable colour per name, so a user keeps theirs across reloads and tabs. */
function colourOf(name) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.codePointAt(0)) >>> 0;
  return `hsl(${h % 360} 65% 42%)`;
}

// ---------- token ----------
let devOff = false;
/** `?token=` wins; otherwise a dev token from this node (dev mode: no JWT key configured). */
async function getToken(name) {
  if (params.get('token')) return params.get('token');
  const res = await fetch('/v1/dev/token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ sub, name, rooms: { '*': 'editor' } }),
  });
  if (res.status === 404) {
    devOff = true;
    throw new Error('dev mode is off: open this page with ?token=<JWT>');
  }
  if (!res.ok) throw new Error(`dev token: HTTP ${res.status} ${await res.text()}`);
  return (await res.json()).token;
}

// ---------- status ----------
const state = { status: 'idle', synced: false, problem: '' };
function showStatus() {
  const s = state.problem ? 'refused' : state.synced ? 'synced' : state.status;
  $('status').dataset.status = s;
  $('status').textContent = state.problem || s;
}

/** The node behind this page: /readyz names it (any node answers for itself). */
async function showNode() {
  const res = await fetch('/readyz').catch(() => null);
  const body = res ? await res.json().catch(() => ({})) : {};
  $('node').textContent = body.node_id ? `node ${body.node_id} · ${location.host}` : location.host;
}

// ---------- the text binding ----------

/** Local edit → the smallest delete + insert between the Y.Text's value and the textarea's
 *  (common prefix and suffix kept), in one transaction, so concurrent typing in two places
 *  merges instead of one value overwriting the other. */
function applyLocal(text, now) {
  const old = text.toString();
  if (old === now) return;
  let start = 0;
  while (start < old.length && start < now.length && old[start] === now[start]) start++;
  let endOld = old.length;
  let endNew = now.length;
  while (endOld > start && endNew > start && old[endOld - 1] === now[endNew - 1]) { endOld--; endNew--; }
  text.doc.transact(() => {
    if (endOld > start) text.delete(start, endOld - start);
    if (endNew > start) text.insert(start, now.slice(start, endNew));
  });
}

/** A caret index moved through a Y.Text delta: text inserted before it pushes it right, text
 *  deleted before it pulls it left (never past the deletion's start). An insert exactly at the
 *  caret stays after it, so someone typing where my caret is does not drag my caret along. */
function mapIndex(index, delta) {
  let pos = 0; // index in the old text
  let moved = index;
  for (const op of delta) {
    if (pos >= index) break;
    if (op.retain !== undefined) pos += op.retain;
    else if (op.insert !== undefined) moved += typeof op.insert === 'string' ? op.insert.length : 1;
    else if (op.delete !== undefined) {
      moved -= Math.min(op.delete, index - pos);
      pos += op.delete;
    }
  }
  return moved;
}

function bind(text, area) {
  area.value = text.toString();
  const onInput = () => applyLocal(text, area.value);
  area.addEventListener('input', onInput);
  const onChange = (ev) => {
    if (ev.transaction.local) return; // our own input already is the textarea's value
    const focused = document.activeElement === area;
    const [s, e, dir] = [area.selectionStart, area.selectionEnd, area.selectionDirection];
    const top = area.scrollTop;
    area.value = text.toString();
    if (focused) area.setSelectionRange(mapIndex(s, ev.delta), mapIndex(e, ev.delta), dir);
    area.scrollTop = top;
  };
  text.observe(onChange);
  return () => { area.removeEventListener('input', onInput); text.unobserve(onChange); };
}

// ---------- awareness ----------
function showPeers(provider) {
  const me = provider.awareness.clientID;
  const rows = [...provider.awareness.getStates()]
    .filter(([, s]) => s?.user?.name)
    .sort(([a, x], [b, y]) => (b === me) - (a === me) || x.user.name.localeCompare(y.user.name) || a - b);
  $('peers').replaceChildren(...rows.map(([id, s]) => {
    const li = document.createElement('li');
    li.dataset.client = String(id);
    li.dataset.name = s.user.name;
    const dot = document.createElement('span');
    dot.className = 'dot';
    dot.style.background = s.user.color;
    li.append(dot, s.user.name);
    if (id === me) li.append(Object.assign(document.createElement('span'), { className: 'you', textContent: ' (you)' }));
    return li;
  }));
  $('count').textContent = String(rows.length);
}

// ---------- session: one document, one provider ----------
let session = null;

async function open() {
  const room = $('room').value.trim();
  const name = $('name').value.trim() || 'anon';
  if (!ENTITY.test(room)) {
    state.problem = `"${room}" is not a document name (type:id, e.g. scene:demo)`;
    return showStatus();
  }
  session?.close();
  session = null;
  state.problem = '';
  state.synced = false;
  state.status = 'connecting';
  showStatus();
  store.setItem('lockstep.yjs.name', name);
  const url = new URL(location.href);
  url.searchParams.set('room', room);
  history.replaceState(null, '', url);

  let token;
  try {
    token = await getToken(name);
  } catch (e) {
    state.problem = e.message;
    return showStatus();
  }
  const doc = new Y.Doc();
  const ws = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/yjs`;
  const provider = new WebsocketProvider(ws, room, doc, {
    params: { token },
    // Tabs of one browser would otherwise sync through a BroadcastChannel, hiding the server.
    disableBc: true,
    // 4001 (bad or expired token) and 4003 (no role here) do not heal by retrying the same URL.
    shouldReconnect: (ev) => ev.code !== 4001 && ev.code !== 4003 && !(ev.code >= 4400 && ev.code < 4500),
  });
  const text = doc.getText('text');
  const unbind = bind(text, $('text'));
  provider.awareness.setLocalStateField('user', { name, color: colourOf(name) });
  provider.awareness.on('change', () => showPeers(provider));
  provider.on('status', ({ status }) => { state.status = status; showStatus(); });
  provider.on('sync', (synced) => { state.synced = synced; showStatus(); });
  let refreshed = false;
  provider.on('closed', async ({ code, reason }) => {
    // A dev token may have expired: one fresh token, one more try.
    if (code === 4001 && !params.get('token') && !refreshed) {
      refreshed = true;
      try {
        provider.params.token = await getToken(name);
        provider.connect();
        return;
      } catch { /* shown below */ }
    }
    state.problem = code === 4003 ? `no role in ${room}` : `closed ${code}${reason ? `: ${reason}` : ''}`;
    showStatus();
  });
  provider.on('sync', (synced) => { if (synced) refreshed = false; });
  showPeers(provider);
  session = {
    provider,
    doc,
    text,
    close() { unbind(); provider.destroy(); doc.destroy(); },
  };
}

// ---------- the form ----------
$('name').value = params.get('name') || store.getItem('lockstep.yjs.name') || NAMES[Math.floor(Math.random() * NAMES.length)];
$('room').value = params.get('room') || 'scene:demo';
if (params.get('token')) $('token-note').hidden = false;
$('form').addEventListener('submit', (e) => { e.preventDefault(); open(); });
// A new name is only an awareness change: no reconnect.
$('name').addEventListener('input', () => {
  const name = $('name').value.trim() || 'anon';
  store.setItem('lockstep.yjs.name', name);
  session?.provider.awareness.setLocalStateField('user', { name, color: colourOf(name) });
});

window.yjsDemo = {
  get status() { return state.status; },
  get synced() { return session?.provider.synced === true; },
  get devOff() { return devOff; },
  text: () => session?.text.toString(),
  peers: () => [...(session?.provider.awareness.getStates().values() ?? [])].map((s) => s?.user?.name).filter(Boolean).sort(),
};
showNode();
open();
