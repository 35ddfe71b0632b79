// The browser page of chromium.test.mjs: a textarea bound to one Y.Text through a real
// y-websocket provider (the browser's own WebSocket), plus the awareness peers as a list. The
// test drives it by typing into the textarea and reads the DOM; `window.yjsPage` exposes the
// provider state for waits.
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

const params = new URLSearchParams(location.hash.slice(1));
const doc = new Y.Doc();
const provider = new WebsocketProvider(params.get('server'), params.get('room'), doc, {
  params: { token: params.get('token') },
  disableBc: true, // two contexts must sync through the gateway, not through a local channel
});
provider.awareness.setLocalStateField('user', { name: params.get('name') });

const text = doc.getText('text');
const area = document.getElementById('text');
const peers = document.getElementById('peers');

// Local typing becomes a minimal diff on the Y.Text (common prefix/suffix), so concurrent
// typing in two contexts merges instead of one overwriting the other.
area.addEventListener('input', () => {
  const now = area.value;
  const old = text.toString();
  let start = 0;
  while (start < old.length && start < now.length && old[start] === now[start]) start++;
  let endOld = old.length;
  let endNew = now.length;
  while (endOld > start && endNew > start && old[endOld - 1] === now[endNew - 1]) { endOld--; endNew--; }
  doc.transact(() => {
    if (endOld > start) text.delete(start, endOld - start);
    if (endNew > start) text.insert(start, now.slice(start, endNew));
  });
});
text.observe((ev) => {
  if (ev.transaction.local) return;
  area.value = text.toString();
});

const showPeers = () => {
  const names = [...provider.awareness.getStates()]
    .filter(([id, s]) => id !== doc.clientID && s?.user?.name)
    .map(([, s]) => s.user.name)
    .sort();
  peers.textContent = names.join(',');
};
provider.awareness.on('change', showPeers);

window.yjsPage = {
  get synced() { return provider.synced; },
  text: () => text.toString(),
};
