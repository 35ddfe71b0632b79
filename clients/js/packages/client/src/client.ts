/**
 * `Lockstep`: the connection. It owns the socket, the close-code policy (retry with resume,
 * refresh the token, or stop), full-jitter backoff, the app-level ping, token refresh on
 * `auth.expiring`, the request table, and routes room frames to `Room`s.
 */
import { backoffDelay } from "./backoff.js";
import { type Codec, jsonCodec, msgpackCodec } from "./codec.js";
import { Emitter } from "./emitter.js";
import { LockstepError } from "./errors.js";
import { loadMsgpack } from "./msgpack-default.js";
import { errorFromFrame, type Pending, type RequestOptions, RequestTable } from "./requests.js";
import { Room } from "./room.js";
import type { ClosedEvent, Json, LockstepOptions, LostReason, Status, User, WebSocketConstructor, WebSocketLike } from "./types.js";
import { socketUrl } from "./url.js";
import { compact, type Frame, num, toHolder } from "./wire.js";

export interface ClientEvents {
  status: (s: Status) => void;
  error: (e: LockstepError) => void;
  closed: (e: ClosedEvent) => void;
}

export interface Session {
  sessionId: string;
  nodeId: string;
  user: User;
}

/** What a close code means to the client (docs/protocol.md, "Close codes"). */
type Plan =
  | { kind: "resume"; delayMs?: number }
  | { kind: "new_session" }
  | { kind: "refresh"; newSession: boolean }
  | { kind: "stop" };

/** The code a client-side dead-socket close uses: not 1000, which would end the session. */
export const DEAD_SOCKET_CODE = 4000;
/** Remembered acquires whose grant may still arrive after they timed out or were aborted. */
const LATE_ACQUIRES_MAX = 256;

export class Lockstep<P = Json, B extends Record<string, Json> = Record<string, Json>> extends Emitter<ClientEvents> {
  private _status: Status = "disconnected";
  private _session: Session | null = null;

  readonly cursorThrottleMs: number;
  private readonly url: string;
  private readonly getToken: () => string | Promise<string>;
  private readonly Ctor: WebSocketConstructor;
  private readonly encoding: "json" | "msgpack";
  private readonly msgpack: LockstepOptions["msgpack"];
  private readonly requestTimeoutMs: number;
  private readonly delay: { min: number; max: number };
  private readonly pingIntervalOpt: number | undefined;
  private readonly pongTimeoutMs: number;
  private readonly random: () => number;

  private readonly requests: RequestTable;
  private readonly rooms = new Map<string, Room<P, B>>();
  private codec: Codec | null = null;
  private ws: WebSocketLike | null = null;
  private gen = 0;
  private running = false;
  private stopped = false;
  private everWelcomed = false;
  private attempt = 0;
  private token: string | null = null;
  private tokenStale = true;
  /** A 4001 came since the last welcome and a fresh token was asked for: a second one is final. */
  private authRetried = false;
  private resumeToken: string | null = null;
  private heartbeatMs = 30_000;
  private lastRx = 0;
  private reconnectAfterMs: number | null = null;
  private shareCursor = true;
  private lateAcquires = new Map<number, { room: string; resource: string }>();
  private connectWaiters: { resolve: () => void; reject: (e: LockstepError) => void }[] = [];
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private welcomeTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setTimeout> | null = null;
  private pongTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(options: LockstepOptions) {
    super();
    if (!options || typeof options.url !== "string") throw new LockstepError("bad_options", "`url` is required");
    if (typeof options.getToken !== "function") throw new LockstepError("bad_options", "`getToken` is required");
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) throw new LockstepError("bad_options", "no global WebSocket: pass the `WebSocket` option (e.g. the `ws` package's WebSocket in Node)");
    this.url = options.url;
    this.getToken = options.getToken;
    this.Ctor = Ctor;
    this.encoding = options.encoding ?? "json";
    this.msgpack = options.msgpack;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.delay = options.reconnectDelayMs ?? { min: 250, max: 20_000 };
    this.pingIntervalOpt = options.pingIntervalMs;
    this.pongTimeoutMs = options.pongTimeoutMs ?? 5_000;
    this.cursorThrottleMs = options.cursorThrottleMs ?? 50;
    this.random = options.random ?? Math.random;
    this.requests = new RequestTable(options.maxPendingRequests ?? 1_000, this.requestTimeoutMs, (p) => this.onRequestTimeout(p));
  }

  /** A new value only on change (the `status` event fires then). */
  get status(): Status {
    return this._status;
  }

  /** This connection's session, from the last `welcome`; null before one and after a stop. */
  get session(): Session | null {
    return this._session;
  }

  get sessionId(): string | null {
    return this._session?.sessionId ?? null;
  }

  /** Resolves on the first `welcome`; rejects if the client ends up `disconnected` before that. */
  connect(): Promise<void> {
    if (this._status === "connected") return Promise.resolve();
    const p = new Promise<void>((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
    if (!this.running) {
      this.running = true;
      this.stopped = false;
      this.everWelcomed = false;
      this.attempt = 0;
      this.setStatus("connecting");
      void this.open();
    }
    return p;
  }

  /** Closes with 1000: the server ends the session at once (its locks are released). */
  close(): void {
    if (!this.running) return;
    const ws = this.ws;
    this.detach();
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        // A socket still connecting cannot always be closed politely; it is dropped either way.
      }
    }
    this.emit("closed", { code: 1000, reason: "client closed", willReconnect: false });
    this.end("session_ended", new LockstepError("disconnected", "the client was closed"), null);
  }

  /** One `Room` per name. */
  room(name: string): Room<P, B> {
    let r = this.rooms.get(name);
    if (!r) this.rooms.set(name, (r = new Room<P, B>(this, name)));
    return r;
  }

  // ---- Core (used by rooms and locks) ----

  /** @internal */
  _online(): boolean {
    return this._status === "connected" && this.ws !== null;
  }

  /** @internal */
  _request(msg: Record<string, unknown>, opts?: RequestOptions): Promise<Frame> {
    return this._start(msg, opts).promise;
  }

  /** @internal */
  _start(msg: Record<string, unknown>, opts: RequestOptions = {}): { id: number; promise: Promise<Frame> } {
    if (this.stopped) {
      return { id: -1, promise: Promise.reject(new LockstepError("disconnected", "the client is disconnected; call connect() first")) };
    }
    const r = this.requests.add(msg, opts);
    if (r instanceof LockstepError) return { id: -1, promise: Promise.reject(r) };
    if (this._online()) this.transmit(r.pending);
    return { id: r.pending.id, promise: r.promise };
  }

  /** @internal */
  _cancel(id: number, err: LockstepError): boolean {
    const p = this.requests.get(id);
    if (!p) return false;
    p.reject(err);
    return true;
  }

  /** @internal */
  _untime(id: number): void {
    const p = this.requests.get(id);
    if (p) this.requests.clearTimer(p);
  }

  /** @internal */
  _send(msg: Record<string, unknown>): boolean {
    if (!this._online() || !this.ws || !this.codec) return false;
    try {
      this.ws.send(this.codec.encode(msg) as string);
      return true;
    } catch {
      return false;
    }
  }

  /** @internal */
  _noteLateAcquire(id: number, room: string, resource: string): void {
    this.lateAcquires.set(id, { room, resource });
    if (this.lateAcquires.size > LATE_ACQUIRES_MAX) {
      const first = this.lateAcquires.keys().next().value;
      if (first !== undefined) this.lateAcquires.delete(first);
    }
  }

  /** @internal */
  _reportError(e: LockstepError): void {
    this.emit("error", e);
  }

  /** @internal */
  async _setShareCursor(share: boolean): Promise<void> {
    this.shareCursor = share;
    await this._request({ type: "settings", share_cursor: share });
  }

  // ---- socket lifecycle ----

  private async open(): Promise<void> {
    const gen = ++this.gen;
    try {
      if (!this.codec) this.codec = await this.makeCodec();
      if (this.tokenStale || this.token === null) {
        const t = await this.getToken();
        if (typeof t !== "string" || t === "") throw new LockstepError("unauthorized", "getToken() gave no token");
        this.token = t;
        this.tokenStale = false;
      }
    } catch (e) {
      if (gen !== this.gen || !this.running) return;
      const err = e instanceof LockstepError ? e : new LockstepError("get_token_failed", `getToken() failed: ${String(e)}`);
      // `unauthorized` is the app's way to say "no token will come" (signed out, dev mode off),
      // like centrifuge-js's UnauthorizedError: stop instead of retrying forever.
      if (err.code === "bad_options" || err.code === "unauthorized") {
        this.end("session_ended", err, err);
        return;
      }
      this.emit("error", err);
      this.scheduleReconnect();
      return;
    }
    if (gen !== this.gen || !this.running) return;
    let ws: WebSocketLike;
    try {
      ws = new this.Ctor(socketUrl(this.url, this.token, this.resumeToken), [this.codec.protocol]) as unknown as WebSocketLike;
    } catch (e) {
      const err = new LockstepError("bad_options", `cannot open a WebSocket: ${String(e)}`);
      this.end("session_ended", err, err);
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (this.ws === ws) this.onData(ev.data);
    };
    ws.onclose = (ev) => {
      if (this.ws === ws) this.onSocketGone(ev.code, ev.reason ?? "");
    };
    ws.onerror = () => {
      // A close event always follows; the code there decides what happens.
    };
    // A TCP connect or upgrade that hangs would otherwise never end.
    this.welcomeTimer = setTimeout(() => {
      if (this.ws === ws) this.drop("no welcome in time");
    }, this.requestTimeoutMs);
  }

  private async makeCodec(): Promise<Codec> {
    if (this.encoding === "json") return jsonCodec;
    if (this.encoding !== "msgpack") throw new LockstepError("bad_options", `unknown encoding ${String(this.encoding)}`);
    if (this.msgpack) return msgpackCodec(this.msgpack);
    try {
      return msgpackCodec(await loadMsgpack());
    } catch (e) {
      if (e instanceof LockstepError) throw e;
      throw new LockstepError("bad_options", `encoding "msgpack" needs @msgpack/msgpack installed or the \`msgpack\` option: ${String(e)}`);
    }
  }

  /** Drops a socket the client gave up on (dead, or never welcomed): never with 1000. */
  private drop(reason: string): void {
    const ws = this.ws;
    if (!ws) return;
    const t = (ws as { terminate?: () => void }).terminate;
    try {
      if (typeof t === "function") t.call(ws);
      else ws.close(DEAD_SOCKET_CODE, reason);
    } catch {
      // Already closing.
    }
    this.onSocketGone(DEAD_SOCKET_CODE, reason);
  }

  private detach(): void {
    const ws = this.ws;
    if (ws) {
      ws.onmessage = null;
      ws.onclose = null;
      ws.onopen = null;
      // `ws` emits an error when a socket still connecting is closed; nobody needs it.
      ws.onerror = () => undefined;
    }
    this.ws = null;
    this.gen++;
    this.clearTimers();
  }

  private clearTimers(): void {
    for (const t of [this.reconnectTimer, this.welcomeTimer, this.pingTimer, this.pongTimer]) if (t) clearTimeout(t);
    this.reconnectTimer = this.welcomeTimer = this.pingTimer = this.pongTimer = null;
  }

  private onSocketGone(code: number, reason: string): void {
    this.detach();
    for (const r of this.rooms.values()) r._onSocketLost();
    const plan = this.plan(code);
    this.emit("closed", { code, reason, willReconnect: plan.kind !== "stop" });
    if (plan.kind === "stop") {
      const lost: LostReason = code === 4013 ? "revoked" : "session_ended";
      const err = new LockstepError("closed", `connection closed with ${code}${reason ? `: ${reason}` : ""}`, { closeCode: code });
      this.end(lost, err, err);
      return;
    }
    // Requests in flight on the dead socket go again on the next one (the server's answers to
    // join, presence, acquire, release… are the same the second time); a broadcast might have
    // been delivered already, so it is not repeated.
    for (const p of this.requests.all()) {
      if (!p.sent) continue;
      if (p.opts.resend === false) {
        p.reject(new LockstepError("disconnected", `the socket dropped before ${String(p.msg.type)} was acknowledged; it may or may not have been delivered`, { requestId: p.id }));
      } else p.sent = false;
    }
    if (plan.kind === "new_session" || (plan.kind === "refresh" && plan.newSession)) this.resumeToken = null;
    if (plan.kind === "refresh") {
      this.tokenStale = true;
      this.scheduleReconnect(0);
    } else if (plan.kind === "resume" && plan.delayMs !== undefined) {
      this.scheduleReconnect(plan.delayMs);
    } else this.scheduleReconnect();
  }

  private plan(code: number): Plan {
    switch (code) {
      case 1000:
        return { kind: "stop" };
      case 1012: {
        const after = this.reconnectAfterMs;
        this.reconnectAfterMs = null;
        return after === null ? { kind: "resume" } : { kind: "resume", delayMs: after };
      }
      case 4001:
        // Refused again at once with the token getToken just gave: asking again would loop.
        if (this.authRetried) return { kind: "stop" };
        this.authRetried = true;
        return { kind: "refresh", newSession: false };
      case 4009:
      case 4011:
      case 4013:
        return { kind: "stop" };
      case 4010:
        return { kind: "new_session" };
      case 4012:
        return { kind: "refresh", newSession: true };
      default:
        return { kind: "resume" };
    }
  }

  private scheduleReconnect(delayMs?: number): void {
    const d = delayMs ?? backoffDelay(this.attempt++, this.delay.min, this.delay.max, this.random);
    this.setStatus(this.everWelcomed ? "reconnecting" : "connecting");
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      if (this.running) void this.open();
    }, d);
  }

  /** The client stops: rooms and locks end, pending requests reject, status `disconnected`. */
  private end(lost: LostReason, requestError: LockstepError, event: LockstepError | null): void {
    this.detach();
    this.running = false;
    this.stopped = true;
    for (const r of this.rooms.values()) r._onSessionEnded(lost);
    // A release whose session ended has nothing left to release.
    for (const p of this.requests.all()) if (p.opts.onSessionEnd === "resolve") p.resolve({ type: "reply", id: p.id });
    this.requests.rejectAll(
      (p) => new LockstepError(requestError.code, requestError.message, { closeCode: requestError.closeCode, requestId: p.id }),
    );
    this._session = null;
    this.resumeToken = null;
    this.tokenStale = true;
    this.setStatus("disconnected");
    if (event) this.emit("error", event);
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.reject(requestError);
  }

  private setStatus(s: Status): void {
    if (this._status === s) return;
    this._status = s;
    this.emit("status", s);
  }

  // ---- frames ----

  private onData(data: unknown): void {
    this.lastRx = Date.now();
    if (this.pongTimer) {
      clearTimeout(this.pongTimer);
      this.pongTimer = null;
    }
    let f: Frame;
    try {
      f = this.codec!.decode(data);
    } catch (e) {
      this.emit("error", e instanceof LockstepError ? e : new LockstepError("malformed", `undecodable frame: ${String(e)}`));
      return;
    }
    switch (f.type) {
      case "welcome":
        return this.onWelcome(f);
      case "reply":
      case "lock.granted": {
        const p = this.requests.get(f.id);
        if (p) p.resolve(f);
        else this.onLateGrant(f);
        if (f.type === "lock.granted") this.rooms.get(f.room as string)?._onFrame(f);
        return;
      }
      case "error": {
        const p = this.requests.get(f.id);
        if (p) {
          const verdict = p.opts.onError?.(f) ?? "reject";
          if (verdict === "reject") p.reject(errorFromFrame(f, toHolder));
          else if (verdict === "resolve") p.resolve(f);
        } else if (typeof f.id === "number" && this.lateAcquires.has(f.id)) {
          this.lateAcquires.delete(f.id);
        } else this.emit("error", errorFromFrame(f, toHolder));
        return;
      }
      case "pong":
        return;
      case "reconnect":
        this.reconnectAfterMs = Math.max(0, num(f.after_ms));
        return;
      case "auth.expiring":
        void this.refreshToken();
        return;
      default:
        if (typeof f.room === "string") this.rooms.get(f.room)?._onFrame(f);
    }
  }

  private onWelcome(f: Frame): void {
    if (this.welcomeTimer) clearTimeout(this.welcomeTimer);
    this.welcomeTimer = null;
    const prev = this._session?.sessionId ?? null;
    const sessionId = String(f.session_id);
    const resumed = f.resumed === true && prev === sessionId;
    const u = (f.user ?? {}) as { id?: string; name?: string; color?: string; avatar?: string | null };
    const user: User = { id: String(u.id), name: String(u.name ?? u.id), color: String(u.color ?? "") };
    if (u.avatar != null) user.avatar = u.avatar;
    this._session = { sessionId, nodeId: String(f.node_id), user };
    this.resumeToken = typeof f.resume_token === "string" ? f.resume_token : null;
    this.heartbeatMs = num(f.heartbeat_ms) || 30_000;
    this.attempt = 0;
    this.authRetried = false;
    this.reconnectAfterMs = null;
    this.lastRx = Date.now();
    const before = this._status;
    // Online from here, but the status event waits until rooms and requests are re-sent, so a
    // listener that sends something is ordered after the rejoins.
    this._status = "connected";
    if (!resumed && prev !== null) {
      for (const p of this.requests.all()) {
        if (p.opts.session && p.opts.session !== sessionId) {
          if (p.opts.onSessionEnd === "resolve") p.resolve({ type: "reply", id: p.id });
          else p.reject(new LockstepError("disconnected", "the session that held this lock ended", { requestId: p.id }));
        }
      }
      for (const r of this.rooms.values()) r._onSessionReplaced();
    }
    if (!resumed) {
      if (!this.shareCursor) this._send({ type: "settings", share_cursor: false });
      for (const r of this.rooms.values()) r._rejoin();
    }
    // Waits are re-asked here too: a parked session gave them up.
    for (const p of this.requests.all()) if (!p.sent) this.transmit(p);
    this.everWelcomed = true;
    this.armPing();
    if (before !== "connected") this.emit("status", "connected");
    const waiters = this.connectWaiters;
    this.connectWaiters = [];
    for (const w of waiters) w.resolve();
  }

  private transmit(p: Pending): void {
    if (this._send(p.msg)) p.sent = true;
  }

  private onRequestTimeout(p: Pending): void {
    const m = p.msg;
    if (m.type !== "lock.acquire") return;
    this._noteLateAcquire(p.id, String(m.room), String(m.resource));
    if (m.wait === true) this._send({ type: "lock.cancel_wait", room: m.room, resource: m.resource });
  }

  /** A grant for an acquire nobody waits for any more (timed out, aborted) is given back at once. */
  private onLateGrant(f: Frame): void {
    if (typeof f.id !== "number") return;
    const late = this.lateAcquires.get(f.id);
    if (!late) return;
    this.lateAcquires.delete(f.id);
    if (f.token == null) return;
    this._send(compact({ type: "lock.release", room: late.room, resource: late.resource, token: num(f.token) }));
  }

  private async refreshToken(): Promise<void> {
    try {
      const t = await this.getToken();
      this.token = t;
      await this._request({ type: "auth.refresh", token: t });
    } catch (e) {
      this.emit("error", e instanceof LockstepError ? e : new LockstepError("get_token_failed", `token refresh failed: ${String(e)}`));
    }
  }

  // ---- liveness ----

  private pingInterval(): number {
    return this.pingIntervalOpt ?? Math.min(this.heartbeatMs / 2, 15_000);
  }

  private armPing(): void {
    if (this.pingTimer) clearTimeout(this.pingTimer);
    this.pingTimer = setTimeout(() => this.pingTick(), this.pingInterval());
  }

  /** Pings only when nothing arrived for a whole interval; no frame at all within `pongTimeoutMs` after it means a dead socket. */
  private pingTick(): void {
    this.pingTimer = null;
    if (!this._online()) return;
    const interval = this.pingInterval();
    const idle = Date.now() - this.lastRx;
    if (idle < interval) {
      this.pingTimer = setTimeout(() => this.pingTick(), interval - idle);
      return;
    }
    if (!this.pongTimer) {
      this._send({ type: "ping" });
      const sentAt = Date.now();
      this.pongTimer = setTimeout(() => {
        this.pongTimer = null;
        if (this.lastRx < sentAt) this.drop("no answer to ping");
      }, this.pongTimeoutMs);
    }
    this.pingTimer = setTimeout(() => this.pingTick(), interval);
  }
}
