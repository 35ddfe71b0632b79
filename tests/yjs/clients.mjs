// Yjs clients for the tests: a `Y.Doc` behind a real `WebsocketProvider` (y-websocket 3.1) with
// `ws` as its WebSocket, and small waits on document and awareness state. Cross-tab
// BroadcastChannel sync is disabled: Node has a global BroadcastChannel, and two providers in
// one test process would otherwise sync through it instead of through the gateway.
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
import { waitFor } from './harness.mjs';

export { Y, WebSocket };

export const ROOM = 'scene:1';

// Every WebsocketProvider in Node adds a process 'exit' listener; a test holds more than 10.
process.setMaxListeners(100);

/** Connects a client to `${base}/v1/yjs/${room}?token=…`. `events` records the provider's
 *  connection closes (code, reason) so a test can say what a refused client saw. */
export function connect(base, token, { room = ROOM, name = 'client', connect: autoConnect = true } = {}) {
  const doc = new Y.Doc();
  const provider = new WebsocketProvider(`${base}/v1/yjs`, room, doc, {
    WebSocketPolyfill: WebSocket,
    params: { token },
    disableBc: true,
    connect: autoConnect,
    maxBackoffTime: 500,
  });
  const closes = [];
  provider.on('connection-close', (ev) => closes.push({ code: ev?.code, reason: ev?.reason?.toString?.() ?? '' }));
  provider.awareness.setLocalStateField('user', { name });
  return { doc, provider, closes, text: doc.getText('text'), map: doc.getMap('map'), name };
}

export function synced(client, what = client.name) {
  return waitFor(() => client.provider.synced && client.provider.wsconnected, `${what} synced`);
}

export function close(...clients) {
  for (const c of clients) {
    c.provider.destroy();
    c.doc.destroy();
  }
}

/** Names in `client`'s awareness other than its own. */
export function peerNames(client) {
  const own = client.doc.clientID;
  return [...client.provider.awareness.getStates()]
    .filter(([id, s]) => id !== own && s?.user?.name)
    .map(([, s]) => s.user.name)
    .sort();
}
