/**
 * Public types of `@lockstep/client`: what the SDK exposes (camelCase), never wire frames.
 * The wire shapes and their conversion live in `wire.ts`.
 */

export type Status = "connecting" | "connected" | "reconnecting" | "disconnected";
export type Role = "viewer" | "commenter" | "editor" | "owner";
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };
export type Unsubscribe = () => void;

export interface User {
  id: string;
  name: string;
  color: string;
  avatar?: string;
}

export interface Member<P = Json> {
  userId: string;
  sessionId: string;
  name: string;
  avatar?: string;
  color: string;
  role: Role;
  focus?: string | null;
  state?: P | null;
  since: number;
}

export interface Holder {
  userId: string;
  sessionId: string;
  name: string;
  action: string;
  since: number;
  expiresAt: number;
}

/** One entry of `room.locks.list`. */
export interface LockInfo {
  room: string;
  resource: string;
  action: string;
  expiresAt: number;
  holder: Holder;
  /** Held by this client's session. */
  mine: boolean;
}

export interface Cursor {
  userId: string;
  sessionId: string;
  x: number;
  y: number;
  selection?: Json;
  /** Local receive time (ms since the epoch). */
  at: number;
}

export interface BroadcastEvent<E extends string = string, D = Json> {
  event: E;
  data: D;
  from: { userId: string; sessionId: string; name: string };
}

export type LostReason = "expired" | "disconnected" | "forced" | "revoked" | "lost" | "session_ended";

/** The MessagePack codec the SDK uses when `encoding: "msgpack"`. */
export interface MsgpackCodec {
  encode(v: unknown): Uint8Array;
  decode(b: Uint8Array): unknown;
}

/** The subset of the WHATWG WebSocket the SDK uses (browsers and `ws` 8 both provide it). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol: string;
  binaryType: string;
  send(data: string | ArrayBufferLike | ArrayBufferView): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

/**
 * A WHATWG-style WebSocket constructor: the browser's, or `ws` 8's in Node. The instance type
 * is left open because `ws`'s event types differ from the DOM's; the SDK only uses what
 * `WebSocketLike` lists.
 */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => object;

export interface LockstepOptions {
  /** http(s):// or ws(s):// base of a node or load balancer; the SDK appends `/v1/ws`. */
  url: string;
  /** Called on connect, after close 4001/4012, and on `auth.expiring`. */
  getToken: () => string | Promise<string>;
  /** Default `"json"`. */
  encoding?: "json" | "msgpack";
  /** MessagePack codec; default: `import("@msgpack/msgpack")` (not available in the browser bundle). */
  msgpack?: MsgpackCodec;
  /** Default `globalThis.WebSocket`; pass `ws`'s `WebSocket` in Node 20. */
  WebSocket?: WebSocketConstructor;
  /** Default 10 000; counted from the call, offline time included. */
  requestTimeoutMs?: number;
  /** Default 1 000; past it a call rejects at once with code `queue_full`. */
  maxPendingRequests?: number;
  /** Full-jitter backoff bounds; default `{ min: 250, max: 20_000 }`. */
  reconnectDelayMs?: { min: number; max: number };
  /** App-level ping when nothing was received for this long; default `min(heartbeat_ms / 2, 15_000)`. */
  pingIntervalMs?: number;
  /** No frame at all within this after a ping: the socket is dead; default 5 000. */
  pongTimeoutMs?: number;
  /** Default 50 (latest wins). */
  cursorThrottleMs?: number;
  /** Random source for the backoff jitter (tests); default `Math.random`. */
  random?: () => number;
}

export interface ClosedEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
}

export interface AcquireOptions {
  action: string;
  ttlMs?: number;
  wait?: boolean;
  waitTimeoutMs?: number;
  /** Aborting sends `lock.cancel_wait` and rejects with code `aborted`. */
  signal?: AbortSignal;
  onQueued?: (q: { queuePosition: number; estimatedWaitMs: number; holder: Holder }) => void;
  /** Keep extending until release or loss; `everyMs` defaults to a third of `ttlMs`. */
  autoExtend?: boolean | { everyMs?: number; ttlMs?: number };
}

export interface Lock {
  readonly room: string;
  readonly resource: string;
  readonly action: string;
  readonly token: number;
  readonly expiresAt: number;
  readonly state: "held" | "released" | "lost";
  /** Extends the hold limit to `ttlMs` from now; updates `expiresAt`. */
  extend(ttlMs: number): Promise<void>;
  release(): Promise<void>;
  /** Any end not caused by this handle's `release()` (or its room's `leave()`). */
  on(event: "lost", cb: (reason: LostReason) => void): Unsubscribe;
  /** `expiresAt` or `state` changed. */
  on(event: "change", cb: (lock: Lock) => void): Unsubscribe;
}
