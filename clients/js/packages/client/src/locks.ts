/**
 * `RoomLocks` and `Lock` handles: the room's lock list (from snapshots, `lock.acquired`,
 * `lock.released`), acquires with optional FIFO waits (kept pending past `lock_held` until
 * `lock.granted` or `wait_timeout`; abort sends `lock.cancel_wait`), extend/release by token,
 * auto-extend, and `lost` when a lock ends other than by its handle's `release()`.
 */
import type { Core } from "./core.js";
import { Emitter } from "./emitter.js";
import { LockstepError } from "./errors.js";
import type { AcquireOptions, Lock, LockInfo, LostReason, Unsubscribe } from "./types.js";
import { compact, type Frame, num, toHolder, toLockInfo, type WireHolder, type WireLock } from "./wire.js";

interface LockEvents {
  lost: (reason: LostReason) => void;
  change: (lock: Lock) => void;
}

const LOST_REASONS: readonly string[] = ["expired", "disconnected", "forced", "revoked", "lost"];

function infoEqual(a: LockInfo, b: LockInfo): boolean {
  const h = a.holder;
  const k = b.holder;
  return (
    a.resource === b.resource &&
    a.action === b.action &&
    a.expiresAt === b.expiresAt &&
    a.mine === b.mine &&
    h.userId === k.userId &&
    h.sessionId === k.sessionId &&
    h.name === k.name &&
    h.action === k.action &&
    h.since === k.since &&
    h.expiresAt === k.expiresAt
  );
}

class LockHandle extends Emitter<LockEvents> implements Lock {
  state: "held" | "released" | "lost" = "held";
  /** A release by this handle (or the room's leave) is under way: its end is not a loss. */
  releasing = false;
  private autoTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(
    private readonly owner: RoomLocks,
    private readonly core: Core,
    readonly room: string,
    readonly resource: string,
    readonly action: string,
    public token: number,
    public expiresAt: number,
    private readonly session: string | null,
  ) {
    super();
  }

  override on(event: "lost", cb: (reason: LostReason) => void): Unsubscribe;
  override on(event: "change", cb: (lock: Lock) => void): Unsubscribe;
  override on(event: keyof LockEvents, cb: any): Unsubscribe {
    return super.on(event, cb);
  }

  async extend(ttlMs: number): Promise<void> {
    if (this.state !== "held") throw new LockstepError("lock_not_held", `the lock on ${this.resource} is ${this.state}`, { resource: this.resource });
    let f: Frame;
    try {
      f = await this.core._request(
        { type: "lock.extend", room: this.room, resource: this.resource, token: this.token, ttl_ms: ttlMs },
        { session: this.session ?? undefined, onSessionEnd: "reject" },
      );
    } catch (e) {
      if (e instanceof LockstepError && e.code === "lock_not_held") this._lose(this.expiresAt <= Date.now() ? "expired" : "lost");
      throw e;
    }
    this._setExpires(num(f.expires_at));
  }

  async release(): Promise<void> {
    if (this.state !== "held") return;
    this.releasing = true;
    this.stopAuto();
    try {
      // lock_not_held: it ended meanwhile (or a retried release already went through).
      await this.core._request(
        { type: "lock.release", room: this.room, resource: this.resource, token: this.token },
        { onError: (f) => (f.code === "lock_not_held" ? "resolve" : "reject"), session: this.session ?? undefined, onSessionEnd: "resolve" },
      );
    } catch (e) {
      this.releasing = false;
      throw e;
    }
    this._released();
  }

  /** @internal */
  _setExpires(at: number): void {
    if (this.state !== "held" || !at || at === this.expiresAt) return;
    this.expiresAt = at;
    this.emit("change", this);
  }

  /** @internal */
  _released(): void {
    if (this.state !== "held") return;
    this.state = "released";
    this.stopAuto();
    this.owner._forget(this);
    this.emit("change", this);
  }

  /** @internal */
  _lose(reason: LostReason): void {
    if (this.state !== "held") return;
    if (this.releasing) return this._released();
    this.state = "lost";
    this.stopAuto();
    this.owner._forget(this);
    this.emit("lost", reason);
    this.emit("change", this);
  }

  /** @internal Extends every `everyMs` by `ttlMs` while held; a failed extend that is not a loss is retried next time. */
  _autoExtend(ttlMs: number, everyMs: number): void {
    if (this.autoTimer || this.state !== "held") return;
    const tick = () => {
      this.autoTimer = setTimeout(async () => {
        this.autoTimer = null;
        if (this.state !== "held") return;
        if (this.core._online()) {
          try {
            await this.extend(ttlMs);
          } catch (e) {
            if (this.state === "held" && e instanceof LockstepError && e.code !== "timeout" && e.code !== "unavailable" && e.code !== "rate_limited") {
              this.core._reportError(e);
            }
          }
        }
        if (this.state === "held" && !this.autoTimer) tick();
      }, everyMs);
    };
    tick();
  }

  private stopAuto(): void {
    if (this.autoTimer) clearTimeout(this.autoTimer);
    this.autoTimer = null;
  }
}

export class RoomLocks extends Emitter<{ change: (list: readonly LockInfo[]) => void }> {
  private _list: readonly LockInfo[] = [];
  private _held: readonly Lock[] = [];

  private infos = new Map<string, LockInfo>();
  private handles = new Map<string, LockHandle>();
  /** Acquire requests in flight or queued, by id (rejected when the room is left). */
  private acquiring = new Set<number>();

  /** @internal */
  constructor(
    private readonly core: Core,
    private readonly room: string,
  ) {
    super();
  }

  /** Every lock visible in the room; a new array on change. */
  get list(): readonly LockInfo[] {
    return this._list;
  }

  /** This session's live handles in the room; a new array on change. */
  get held(): readonly Lock[] {
    return this._held;
  }

  get(resource: string): LockInfo | undefined {
    return this.infos.get(resource);
  }

  /**
   * Resolves with a held `Lock`. Denied: rejects `lock_held` (with `holder`,
   * `estimatedWaitMs`); with `wait: true` it stays pending in the queue (`onQueued`) until
   * granted, `wait_timeout`, or `signal` aborts (which sends `lock.cancel_wait`).
   */
  async acquire(resource: string, opts: AcquireOptions): Promise<Lock> {
    if (opts.signal?.aborted) throw new LockstepError("aborted", "the acquire was aborted", { resource });
    const msg = compact({
      type: "lock.acquire",
      room: this.room,
      resource,
      action: opts.action,
      ttl_ms: opts.ttlMs,
      wait: opts.wait ? true : undefined,
      wait_timeout_ms: opts.waitTimeoutMs,
    });
    let id = -1;
    const started = this.core._start(msg, {
      onError: (f) => {
        if (f.code !== "lock_held" || !opts.wait || f.queue_position == null) return "reject";
        // Queued: the server times the wait from here (wait_timeout), not the request timeout.
        this.core._untime(id);
        try {
          opts.onQueued?.({
            queuePosition: num(f.queue_position),
            estimatedWaitMs: num(f.estimated_wait_ms),
            holder: toHolder(f.holder as WireHolder),
          });
        } catch {
          // The caller's callback must not keep the wait from being tracked.
        }
        return "keep";
      },
    });
    id = started.id;
    this.acquiring.add(id);
    const onAbort = () => {
      if (!this.core._cancel(id, new LockstepError("aborted", "the acquire was aborted", { resource, requestId: id }))) return;
      this.core._noteLateAcquire(id, this.room, resource);
      if (opts.wait) this.core._request({ type: "lock.cancel_wait", room: this.room, resource }).catch(() => undefined);
    };
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    let f: Frame;
    try {
      f = await started.promise;
    } finally {
      this.acquiring.delete(id);
      opts.signal?.removeEventListener("abort", onAbort);
    }
    const lock = this.adopt(resource, opts.action, num(f.token), num(f.expires_at));
    if (opts.autoExtend) {
      const cfg = typeof opts.autoExtend === "object" ? opts.autoExtend : {};
      const ttl = cfg.ttlMs ?? opts.ttlMs ?? Math.max(1_000, lock.expiresAt - Date.now());
      lock._autoExtend(ttl, cfg.everyMs ?? Math.max(50, Math.floor(ttl / 3)));
    }
    return lock;
  }

  /** Owners: `lock.release` with `force: true`. */
  async forceRelease(resource: string): Promise<void> {
    await this.core._request({ type: "lock.release", room: this.room, resource, force: true });
  }

  // ---- from the room ----

  /** @internal */
  _forget(h: LockHandle): void {
    if (this.handles.get(h.resource) !== h) return;
    this.handles.delete(h.resource);
    this.heldChanged();
  }

  /** @internal */
  _applySnapshot(wire: WireLock[]): void {
    const me = this.core.sessionId;
    const next = new Map<string, LockInfo>();
    let changed = false;
    for (const w of wire) {
      const info = toLockInfo(this.room, w, me);
      const old = this.infos.get(w.resource);
      if (old && infoEqual(old, info)) next.set(w.resource, old);
      else {
        next.set(w.resource, info);
        changed = true;
      }
      if (info.mine && w.token != null) {
        const token = num(w.token);
        const h = this.handles.get(w.resource);
        if (h && h.token === token) h._setExpires(info.expiresAt);
        else {
          h?._lose("lost");
          // Ours without a handle: a hand-off that raced a park, listed in the resume snapshot.
          this.adopt(w.resource, info.action, token, info.expiresAt);
        }
      }
    }
    if (next.size !== this.infos.size) changed = true;
    for (const [resource, h] of [...this.handles]) {
      const info = next.get(resource);
      const w = wire.find((x) => x.resource === resource);
      if (!info || !info.mine || (w?.token != null && num(w.token) !== h.token)) h._lose(h.expiresAt <= Date.now() ? "expired" : "lost");
    }
    if (changed) this.publish(next);
  }

  /** @internal */
  _onEvent(f: Frame): void {
    if (f.type === "lock.acquired") {
      const info = toLockInfo(this.room, f as unknown as WireLock, this.core.sessionId);
      const h = this.handles.get(info.resource);
      if (h && !info.mine) h._lose("lost");
      else if (h) h._setExpires(info.expiresAt);
      const old = this.infos.get(info.resource);
      if (old && infoEqual(old, info)) return;
      const next = new Map(this.infos);
      next.set(info.resource, info);
      this.publish(next);
    } else if (f.type === "lock.released") {
      const resource = String(f.resource);
      const h = this.handles.get(resource);
      if (h) {
        const reason = String(f.reason);
        if (reason === "released") h._released();
        else h._lose((LOST_REASONS.includes(reason) ? reason : "lost") as LostReason);
      }
      if (!this.infos.has(resource)) return;
      const next = new Map(this.infos);
      next.delete(resource);
      this.publish(next);
    }
  }

  /** @internal The room was left: its locks were released by the server, its waits dropped. */
  _onLeft(): void {
    for (const h of [...this.handles.values()]) {
      h.releasing = true;
      h._released();
    }
    for (const id of [...this.acquiring]) this.core._cancel(id, new LockstepError("disconnected", `left ${this.room}`, { requestId: id }));
    if (this.infos.size) this.publish(new Map());
  }

  /** @internal The session ended (or was replaced): every handle is lost; `clearList` when the room is gone too. */
  _onSessionEnded(reason: LostReason, clearList: boolean): void {
    for (const h of [...this.handles.values()]) h._lose(reason);
    if (clearList && this.infos.size) this.publish(new Map());
  }

  private adopt(resource: string, action: string, token: number, expiresAt: number): LockHandle {
    const h = this.handles.get(resource);
    if (h && h.state === "held" && h.token === token) {
      h._setExpires(expiresAt);
      return h;
    }
    h?._lose("lost");
    const lock = new LockHandle(this, this.core, this.room, resource, action, token, expiresAt, this.core.sessionId);
    this.handles.set(resource, lock);
    this.heldChanged();
    return lock;
  }

  /** `held` is part of what `change` announces: a grant's handle arrives after the room's `lock.acquired`. */
  private heldChanged(): void {
    this._held = [...this.handles.values()];
    this.emit("change", this._list);
  }

  private publish(next: Map<string, LockInfo>): void {
    this.infos = next;
    this._list = [...next.values()];
    this.emit("change", this._list);
  }
}

