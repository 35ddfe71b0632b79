/**
 * `Room`: membership of one room. It keeps `members`/`others`/`self`/`cursors` as immutable
 * snapshots (a new object only on a real change, for React's useSyncExternalStore), assembles
 * paged `room.snapshot`s, diffs every snapshot against local state (no flapping after a
 * resume), applies events after a snapshot as upserts, and throttles cursors.
 */
import type { Core } from "./core.js";
import { Emitter } from "./emitter.js";
import { LockstepError } from "./errors.js";
import { RoomLocks } from "./locks.js";
import type { BroadcastEvent, Cursor, Json, LostReason, Member } from "./types.js";
import { compact, deepEqual, type Frame, num, toMember, type WireLock, type WireMember } from "./wire.js";

export interface PresenceEvent<P> {
  type: "join" | "update" | "leave";
  member: Member<P>;
}

/** A broadcast typed by the room's event map `B`: a union discriminated by `event`. */
export type RoomBroadcast<B extends Record<string, Json>> = { [K in keyof B & string]: BroadcastEvent<K, B[K]> }[keyof B & string];

export interface RoomEvents<P, B extends Record<string, Json> = Record<string, Json>> {
  members: (m: readonly Member<P>[]) => void;
  presence: (e: PresenceEvent<P>) => void;
  cursor: (c: Cursor) => void;
  cursors: (m: ReadonlyMap<string, Cursor>) => void;
  broadcast: (e: RoomBroadcast<B>) => void;
  joined: () => void;
  left: () => void;
}

function memberEqual<P>(a: Member<P>, b: Member<P>): boolean {
  return (
    a.userId === b.userId &&
    a.sessionId === b.sessionId &&
    a.name === b.name &&
    a.avatar === b.avatar &&
    a.color === b.color &&
    a.role === b.role &&
    (a.focus ?? null) === (b.focus ?? null) &&
    a.since === b.since &&
    deepEqual(a.state ?? null, b.state ?? null)
  );
}

function sameItems<T>(a: readonly T[], b: readonly T[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

export class Room<P = Json, B extends Record<string, Json> = Record<string, Json>> extends Emitter<RoomEvents<P, B>> {
  readonly name: string;
  readonly locks: RoomLocks;
  private _joined = false;
  private _members: readonly Member<P>[] = [];
  private _self: Member<P> | null = null;
  private _others: readonly Member<P>[] = [];
  private _cursors: ReadonlyMap<string, Cursor> = new Map();

  private readonly core: Core;
  private bySession = new Map<string, Member<P>>();
  /** The client wants to be in the room (join called, leave not): rejoined on a new session. */
  private wanted = false;
  private state: P | null | undefined;
  private focus: string | null | undefined;
  private pages: { members: WireMember[]; locks: WireLock[]; pages: number } | null = null;
  /** Room events that arrived between pages of a snapshot, applied after it. */
  private held: Frame[] = [];
  private cursorLatest: { x: number; y: number; selection?: Json } | null = null;
  private cursorTimer: ReturnType<typeof setTimeout> | null = null;
  private cursorSentAt = 0;

  /** @internal */
  constructor(core: Core, name: string) {
    super();
    this.core = core;
    this.name = name;
    this.locks = new RoomLocks(core, name);
  }

  /** Joined (the join was answered) and not left since. */
  get joined(): boolean {
    return this._joined;
  }

  /** Includes self; a new array on every change, the same array otherwise. */
  get members(): readonly Member<P>[] {
    return this._members;
  }

  /** This session's member entry. */
  get self(): Member<P> | null {
    return this._self;
  }

  /** Members minus self; a new array only when its content changed. */
  get others(): readonly Member<P>[] {
    return this._others;
  }

  /** Other sessions' cursors by session id; a new Map on change. */
  get cursors(): ReadonlyMap<string, Cursor> {
    return this._cursors;
  }

  /** Resolves once the room's snapshot is applied and the server replied. */
  async join(opts: { state?: P; focus?: string | null } = {}): Promise<void> {
    if (opts.state !== undefined) this.state = opts.state;
    if (opts.focus !== undefined) this.focus = opts.focus;
    this.wanted = true;
    try {
      await this.core._request(compact({ type: "join", room: this.name, state: this.state }));
      if (opts.focus !== undefined) await this.core._request({ type: "presence", room: this.name, focus: opts.focus });
    } catch (e) {
      if (!this._joined) this.wanted = false;
      throw e;
    }
    this.markJoined();
  }

  async leave(): Promise<void> {
    this.wanted = false;
    try {
      // Already out (a retry after a lost reply): that is what was asked for.
      await this.core._request({ type: "leave", room: this.name }, { onError: (f) => (f.code === "not_in_room" ? "resolve" : "reject") });
    } finally {
      this.clear(null);
    }
  }

  /** Absent fields stay unchanged; `null` clears. */
  async updatePresence(p: { focus?: string | null; state?: P | null }): Promise<void> {
    const msg: Record<string, unknown> = { type: "presence", room: this.name };
    if (p.focus !== undefined) msg.focus = this.focus = p.focus;
    if (p.state !== undefined) msg.state = this.state = p.state;
    await this.core._request(msg);
  }

  /** Throttled to one frame per `cursorThrottleMs`, latest wins; dropped while offline or not joined. */
  moveCursor(c: { x: number; y: number; selection?: Json }): void {
    if (!this._joined || !this.core._online()) {
      this.cursorLatest = null;
      return;
    }
    this.cursorLatest = c;
    if (this.cursorTimer) return;
    const wait = this.cursorSentAt + this.core.cursorThrottleMs - Date.now();
    if (wait <= 0) this.flushCursor();
    else
      this.cursorTimer = setTimeout(() => {
        this.cursorTimer = null;
        this.flushCursor();
      }, wait);
  }

  /** Not repeated after a dropped socket (it may have been delivered). */
  async broadcast<K extends keyof B & string>(event: K, data: B[K]): Promise<void> {
    await this.core._request({ type: "broadcast", room: this.name, event, data }, { resend: false });
  }

  /** `settings {share_cursor}`: session-wide on the wire, kept across new sessions. */
  setShareCursor(share: boolean): Promise<void> {
    return this.core._setShareCursor(share);
  }

  // ---- from the client ----

  /** @internal */
  _onFrame(f: Frame): void {
    if (!this.wanted) return;
    if (f.type === "room.snapshot") return this.onSnapshotPage(f);
    if (this.pages) {
      this.held.push(f);
      return;
    }
    this.apply(f);
  }

  /** @internal A new session replaced the one this room was joined in. */
  _onSessionReplaced(): void {
    this.locks._onSessionEnded("session_ended", false);
  }

  /** @internal On a new session: join again with the last presence. */
  _rejoin(): void {
    if (!this.wanted || !this._joined) return;
    const focus = this.focus;
    this.core
      ._request(compact({ type: "join", room: this.name, state: this.state }))
      .then(() => (focus !== undefined && focus !== null ? this.core._request({ type: "presence", room: this.name, focus }) : undefined))
      .catch((e: LockstepError) => {
        if (e.code === "disconnected" || e.code === "closed" || e.code === "timeout") return;
        // The new session may not enter (room full, role withdrawn): the room is left.
        this.wanted = false;
        this.clear(null);
        this.core._reportError(e);
      });
  }

  /** @internal */
  _onSocketLost(): void {
    if (this.cursorTimer) clearTimeout(this.cursorTimer);
    this.cursorTimer = null;
    this.cursorLatest = null;
    this.pages = null;
    this.held = [];
  }

  /** @internal The client stopped (closed, or a fatal close code). */
  _onSessionEnded(reason: LostReason): void {
    this.wanted = false;
    this._onSocketLost();
    this.clear(reason);
  }

  // ---- internals ----

  private markJoined(): void {
    if (this._joined || !this.wanted) return;
    this._joined = true;
    this.emit("joined", undefined);
  }

  private clear(lost: LostReason | null): void {
    const was = this._joined;
    this._joined = false;
    if (this.cursorTimer) clearTimeout(this.cursorTimer);
    this.cursorTimer = null;
    this.cursorLatest = null;
    if (lost) this.locks._onSessionEnded(lost, true);
    else this.locks._onLeft();
    if (this.bySession.size) {
      this.bySession = new Map();
      this.publish();
    }
    if (this._cursors.size) {
      this._cursors = new Map();
      this.emit("cursors", this._cursors);
    }
    if (was) this.emit("left", undefined);
  }

  private flushCursor(): void {
    const c = this.cursorLatest;
    this.cursorLatest = null;
    if (!c || !this._joined) return;
    if (this.core._send(compact({ type: "cursor", room: this.name, x: c.x, y: c.y, selection: c.selection }))) this.cursorSentAt = Date.now();
  }

  private onSnapshotPage(f: Frame): void {
    const pages = num(f.pages) || 1;
    const page = num(f.page) || 1;
    const members = (f.members ?? []) as WireMember[];
    const locks = (f.locks ?? []) as WireLock[];
    if (pages <= 1) return this.applySnapshot(members, locks);
    if (page === 1 || !this.pages) this.pages = { members: [], locks: [], pages };
    this.pages.members.push(...members);
    this.pages.locks.push(...locks);
    if (page < pages) return;
    const whole = this.pages;
    this.pages = null;
    this.applySnapshot(whole.members, whole.locks);
    const held = this.held;
    this.held = [];
    for (const h of held) this.apply(h);
  }

  /** Replaces local state by the snapshot, emitting only the differences. */
  private applySnapshot(wire: WireMember[], locks: WireLock[]): void {
    const next = new Map<string, Member<P>>();
    const events: PresenceEvent<P>[] = [];
    for (const w of wire) {
      const m = toMember<P>(w);
      const old = this.bySession.get(m.sessionId);
      if (old && memberEqual(old, m)) next.set(m.sessionId, old);
      else {
        next.set(m.sessionId, m);
        events.push({ type: old ? "update" : "join", member: m });
      }
    }
    for (const [id, old] of this.bySession) if (!next.has(id)) events.push({ type: "leave", member: old });
    const selfChanged = (this._self?.sessionId ?? null) !== this.core.sessionId;
    this.bySession = next;
    this.locks._applySnapshot(locks);
    if (events.length || selfChanged) {
      this.pruneCursors();
      for (const e of events) this.emit("presence", e);
      this.publish();
    }
  }

  private apply(f: Frame): void {
    switch (f.type) {
      case "presence.join":
      case "presence.update":
        return this.upsert(f.member as WireMember);
      case "presence.leave":
        return this.remove(f.member as WireMember);
      case "cursor":
        return this.onCursor(f);
      case "broadcast": {
        const from = (f.from ?? {}) as { user_id?: string; session_id?: string; name?: string };
        this.emit("broadcast", {
          event: String(f.event),
          data: f.data,
          from: { userId: String(from.user_id), sessionId: String(from.session_id), name: String(from.name ?? from.user_id) },
        } as RoomBroadcast<B>);
        return;
      }
      default:
        this.locks._onEvent(f);
    }
  }

  /** `presence.join` after a snapshot that already has the member is an upsert, not a second join. */
  private upsert(w: WireMember): void {
    if (!w) return;
    const m = toMember<P>(w);
    const old = this.bySession.get(m.sessionId);
    if (old && memberEqual(old, m)) return;
    const next = new Map(this.bySession);
    next.set(m.sessionId, m);
    this.bySession = next;
    this.emit("presence", { type: old ? "update" : "join", member: m });
    this.publish();
  }

  private remove(w: WireMember): void {
    if (!w) return;
    const old = this.bySession.get(w.session_id);
    if (!old) return;
    const next = new Map(this.bySession);
    next.delete(w.session_id);
    this.bySession = next;
    this.pruneCursors();
    this.emit("presence", { type: "leave", member: old });
    this.publish();
  }

  private onCursor(f: Frame): void {
    const sessionId = String(f.session_id);
    if (sessionId === this.core.sessionId) return;
    const c: Cursor = { userId: String(f.user_id), sessionId, x: num(f.x), y: num(f.y), at: Date.now() };
    if (f.selection !== undefined && f.selection !== null) c.selection = f.selection as Json;
    const next = new Map(this._cursors);
    next.set(sessionId, c);
    this._cursors = next;
    this.emit("cursor", c);
    this.emit("cursors", next);
  }

  private pruneCursors(): void {
    let next: Map<string, Cursor> | null = null;
    for (const id of this._cursors.keys()) {
      if (!this.bySession.has(id)) {
        next ??= new Map(this._cursors);
        next.delete(id);
      }
    }
    if (next) {
      this._cursors = next;
      this.emit("cursors", next);
    }
  }

  /** New `members` (and `others` only when its content changed), then the `members` event. */
  private publish(): void {
    const me = this.core.sessionId;
    this._members = [...this.bySession.values()];
    this._self = (me && this.bySession.get(me)) || null;
    const others = this._members.filter((m) => m.sessionId !== me);
    if (!sameItems(others, this._others)) this._others = others;
    this.emit("members", this._members);
  }
}
