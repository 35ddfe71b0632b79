/**
 * Hooks for connection status, room members, this session's presence and live cursors: each
 * one a `useSyncExternalStore` subscription to one of the client's immutable snapshots, with
 * an optional selector and equality to narrow what re-renders.
 */
import { useCallback } from "react";
import type { Cursor, Json, Member, Status } from "@lockstep/client";
import { useClient, useInitialPresence, useRoom, type Presence } from "./providers.js";
import { shallow, useSelected, type IsEqual } from "./store.js";

/** The client's connection status: `connecting`, `connected`, `reconnecting` or `disconnected`. */
export function useStatus(): Status {
  const client = useClient();
  const subscribe = useCallback((cb: () => void) => client.on("status", cb), [client]);
  const get = useCallback(() => client.status, [client]);
  return useSelected(subscribe, get);
}

// Self and others are derived from `members`, and joining or leaving changes `members` too.
function useMembersSubscription(): (cb: () => void) => () => void {
  const room = useRoom();
  return useCallback((cb: () => void) => room.on("members", cb), [room]);
}

/**
 * Everyone in the room, this session included (one entry per session: a user with two tabs is
 * two members). With a `selector`, returns its result and re-renders only when `isEqual`
 * (default `Object.is`) says it changed: `useMembers((m) => m.length)`.
 */
export function useMembers<P = Json>(): readonly Member<P>[];
export function useMembers<P = Json, T = unknown>(
  selector: (members: readonly Member<P>[]) => T,
  isEqual?: IsEqual<T>,
): T;
export function useMembers<P, T>(selector?: (members: readonly Member<P>[]) => T, isEqual?: IsEqual<T>): T {
  const room = useRoom<P>();
  const subscribe = useMembersSubscription();
  const get = useCallback(() => room.members, [room]);
  return useSelected(subscribe, get, selector as (m: readonly Member<P>[]) => T, isEqual);
}

/** The room's members other than this session; a `selector` and `isEqual` as for {@link useMembers}. */
export function useOthers<P = Json>(): readonly Member<P>[];
export function useOthers<P = Json, T = unknown>(
  selector: (others: readonly Member<P>[]) => T,
  isEqual?: IsEqual<T>,
): T;
export function useOthers<P, T>(selector?: (others: readonly Member<P>[]) => T, isEqual?: IsEqual<T>): T {
  const room = useRoom<P>();
  const subscribe = useMembersSubscription();
  const get = useCallback(() => room.others, [room]);
  return useSelected(subscribe, get, selector as (m: readonly Member<P>[]) => T, isEqual);
}

/** This session's member entry, `null` until the room is joined; optional `selector` and `isEqual`. */
export function useSelf<P = Json>(): Member<P> | null;
export function useSelf<P = Json, T = unknown>(selector: (self: Member<P> | null) => T, isEqual?: IsEqual<T>): T;
export function useSelf<P, T>(selector?: (self: Member<P> | null) => T, isEqual?: IsEqual<T>): T {
  const room = useRoom<P>();
  const subscribe = useMembersSubscription();
  const get = useCallback(() => room.self, [room]);
  return useSelected(subscribe, get, selector as (m: Member<P> | null) => T, isEqual);
}

/** This session's presence as `useMyPresence` returns it: focus and state, `null` when unset. */
export interface MyPresence<P = Json> {
  focus: string | null;
  state: P | null;
}
/** Updates this session's presence: an absent field stays, `null` clears it. Resolves on the server's answer. */
export type UpdateMyPresence<P = Json> = (patch: Presence<P>) => Promise<void>;

/**
 * `[presence, update]`, like `useState`: `presence` is what the room sees of this session
 * (before the join: the `RoomProvider`'s `initialPresence`); `update` sends a `presence`
 * message. The room's echo updates `presence`, so it shows what peers see, not an optimistic guess.
 */
export function useMyPresence<P = Json>(): [MyPresence<P>, UpdateMyPresence<P>] {
  const room = useRoom<P>();
  const initial = useInitialPresence<P>();
  const presence = useSelf<P, MyPresence<P>>(
    (self) =>
      self
        ? { focus: self.focus ?? null, state: (self.state ?? null) as P | null }
        : { focus: initial.focus ?? null, state: initial.state ?? null },
    shallow,
  );
  const update = useCallback<UpdateMyPresence<P>>((patch) => handled(room.updatePresence(patch)), [room]);
  return [presence, update];
}

/** Moves this session's cursor: throttled by the client, latest wins, dropped while offline. */
export function useMoveCursor(): (cursor: { x: number; y: number; selection?: Json }) => void {
  const room = useRoom();
  return useCallback((c: { x: number; y: number; selection?: Json }) => room.moveCursor(c), [room]);
}

/**
 * The other sessions' cursors by session id (a new `Map` on every change; a cursor goes when
 * its session leaves). Optional `selector` and `isEqual`: `useCursors((m) => m.get(id))`.
 */
export function useCursors(): ReadonlyMap<string, Cursor>;
export function useCursors<T>(selector: (cursors: ReadonlyMap<string, Cursor>) => T, isEqual?: IsEqual<T>): T;
export function useCursors<T>(selector?: (cursors: ReadonlyMap<string, Cursor>) => T, isEqual?: IsEqual<T>): T {
  const room = useRoom();
  const subscribe = useCallback((cb: () => void) => room.on("cursors", cb), [room]);
  const get = useCallback(() => room.cursors, [room]);
  return useSelected(subscribe, get, selector as (m: ReadonlyMap<string, Cursor>) => T, isEqual);
}

/**
 * Returns `p` after marking its rejection handled: a caller that awaits still gets the error,
 * one that fires and forgets (an `onClick`) does not crash the page with an unhandled rejection.
 */
export function handled<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}
