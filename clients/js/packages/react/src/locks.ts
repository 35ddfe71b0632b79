/**
 * Lock hooks: `useLocks` (every lock visible in the room) and `useLock(resource)` (one
 * resource: who holds it, this session's handle, and acquire/release with their pending
 * state and last error). Lock state comes from the room's `locks.list` snapshot; only the
 * request bookkeeping (pending, queued, error) is component state.
 */
import { useCallback, useEffect, useRef, useState } from "react";
import type { Holder, Lock, LockInfo, LockstepError, Room } from "@lockstep/client";
import { useRoom } from "./providers.js";
import { handled } from "./presence.js";
import { useSelected, type IsEqual } from "./store.js";

/** Options of `useLock(...).acquire`: those of `room.locks.acquire`. */
export type AcquireOptions = Parameters<Room["locks"]["acquire"]>[1];

/** Where a queued acquire stands (from the denial that queued it). */
export interface QueuedInfo {
  queuePosition: number;
  estimatedWaitMs: number;
  holder: Holder;
}

/** What {@link useLock} returns. */
export interface UseLockResult {
  /** The lock on the resource as the room sees it (holder, action, expiry), or `null` when free. */
  info: LockInfo | null;
  /** This session's handle while it holds the lock (token for fencing, `extend`), else `null`. */
  lock: Lock | null;
  /**
   * Acquires the lock. Resolves with the handle; rejects with a `LockstepError` (`lock_held`
   * with the holder, `wait_timeout`, `aborted`, …), which is also stored in `error`. A pending
   * wait is cancelled when the component unmounts.
   */
  acquire: (opts: AcquireOptions) => Promise<Lock>;
  /** Releases this session's lock on the resource; resolves at once when it holds none. */
  release: () => Promise<void>;
  /** An acquire or release is in flight (including a queued wait). */
  pending: boolean;
  /** Set while an acquire with `wait: true` is queued behind the holder. */
  queued: QueuedInfo | null;
  /** The last acquire or release error; cleared by the next call. */
  error: LockstepError | null;
}

function subscribeLocks(room: Room): (cb: () => void) => () => void {
  return (cb) => room.locks.on("change", cb);
}

// The client announces a grant to the room ("change") before the grant's reply arrives, and
// adds the new handle to `room.locks.held` on that reply without another event. So after an
// acquire through a hook resolves, every useLock of the room re-reads `held`: a second
// component showing the same resource gets the handle too.
const heldWatchers = new WeakMap<Room, Set<() => void>>();

function subscribeHeld(room: Room): (cb: () => void) => () => void {
  return (cb) => {
    let set = heldWatchers.get(room);
    if (!set) heldWatchers.set(room, (set = new Set()));
    set.add(cb);
    const off = room.locks.on("change", cb);
    return () => {
      off();
      set.delete(cb);
    };
  };
}

function heldChanged(room: Room): void {
  for (const cb of [...(heldWatchers.get(room) ?? [])]) cb();
}

/**
 * Every lock visible in the room (a new array on every change). Optional `selector` and
 * `isEqual`: `useLocks((l) => l.filter((x) => x.mine).length)`.
 */
export function useLocks(): readonly LockInfo[];
export function useLocks<T>(selector: (locks: readonly LockInfo[]) => T, isEqual?: IsEqual<T>): T;
export function useLocks<T>(selector?: (locks: readonly LockInfo[]) => T, isEqual?: IsEqual<T>): T {
  const room = useRoom();
  const subscribe = useCallback(subscribeLocks(room), [room]);
  const get = useCallback(() => room.locks.list, [room]);
  return useSelected(subscribe, get, selector as (l: readonly LockInfo[]) => T, isEqual);
}

// Two views of the same lock are equal when nothing a component could show changed: another
// resource's change then re-renders nobody watching this one.
function sameInfo(a: LockInfo | null, b: LockInfo | null): boolean {
  if (a === b) return true;
  if (a === null || b === null) return false;
  return (
    a.resource === b.resource &&
    a.action === b.action &&
    a.expiresAt === b.expiresAt &&
    a.mine === b.mine &&
    a.holder.sessionId === b.holder.sessionId &&
    a.holder.since === b.holder.since
  );
}

interface RequestState {
  pending: boolean;
  queued: QueuedInfo | null;
  error: LockstepError | null;
}
const IDLE: RequestState = { pending: false, queued: null, error: null };

/** One resource's lock in the room of the nearest `RoomProvider`: see {@link UseLockResult}. */
export function useLock(resource: string): UseLockResult {
  const room = useRoom();
  const subscribe = useCallback(subscribeLocks(room), [room]);
  const getList = useCallback(() => room.locks.list, [room]);
  const info = useSelected(subscribe, getList, (list) => list.find((l) => l.resource === resource) ?? null, sameInfo);
  // `held` is read through a selector, so it does not matter whether the client caches that
  // array: the Lock handle found in it is the same object for as long as the lock lives.
  const subscribeToHeld = useCallback(subscribeHeld(room), [room]);
  const getHeld = useCallback(() => room.locks.held, [room]);
  const lock = useSelected(subscribeToHeld, getHeld, (held) => held.find((l) => l.resource === resource) ?? null);

  const [request, setRequest] = useState<RequestState>(IDLE);
  // Only the latest call may update the request state; an older one finishing late must not
  // overwrite it. Reset when the resource or room changes.
  const generation = useRef(0);
  const waits = useRef(new Set<AbortController>());
  useEffect(() => {
    generation.current += 1;
    setRequest(IDLE);
    const pendingWaits = waits.current;
    return () => {
      // A wait nobody can see any more would be granted to an unmounted component: cancel it
      // (the client sends lock.cancel_wait). A lock already held stays held.
      for (const ctl of pendingWaits) ctl.abort();
      pendingWaits.clear();
    };
  }, [room, resource]);

  const acquire = useCallback(
    (opts: AcquireOptions): Promise<Lock> => {
      const gen = ++generation.current;
      const ctl = new AbortController();
      const outer = opts.signal;
      const onOuterAbort = () => ctl.abort(outer?.reason);
      if (outer?.aborted) ctl.abort(outer.reason);
      else outer?.addEventListener("abort", onOuterAbort, { once: true });
      waits.current.add(ctl);
      setRequest({ pending: true, queued: null, error: null });
      const p = room.locks.acquire(resource, {
        ...opts,
        signal: ctl.signal,
        onQueued: (q) => {
          if (gen === generation.current) setRequest({ pending: true, queued: q, error: null });
          opts.onQueued?.(q);
        },
      });
      const done = () => {
        waits.current.delete(ctl);
        outer?.removeEventListener("abort", onOuterAbort);
      };
      p.then(
        () => {
          done();
          if (gen === generation.current) setRequest(IDLE);
          heldChanged(room);
        },
        (e: LockstepError) => {
          done();
          if (gen === generation.current) setRequest({ pending: false, queued: null, error: e });
        },
      );
      return handled(p);
    },
    [room, resource],
  );

  const release = useCallback((): Promise<void> => {
    const held = room.locks.held.find((l) => l.resource === resource);
    if (!held) return Promise.resolve();
    const gen = ++generation.current;
    setRequest({ pending: true, queued: null, error: null });
    const p = held.release();
    p.then(
      () => {
        if (gen === generation.current) setRequest(IDLE);
      },
      (e: LockstepError) => {
        if (gen === generation.current) setRequest({ pending: false, queued: null, error: e });
      },
    );
    return handled(p);
  }, [room, resource]);

  return { info, lock, acquire, release, ...request };
}
