/**
 * Selector plumbing over `useSyncExternalStore`: the one place that turns the client's
 * immutable snapshots (`room.members`, `room.cursors`, `room.locks.list`, `client.status`)
 * into React state, and decides when a component re-renders.
 *
 * The client replaces a snapshot object only when it changed, so an unchanged snapshot is
 * recognised by identity and never runs the selector again; a changed one runs it, and if
 * `isEqual` says the result is equal to the last one the previous result is returned, which
 * makes React skip the render.
 */
import { useEffect, useMemo, useRef, useSyncExternalStore } from "react";

export type Subscribe = (onChange: () => void) => () => void;
export type Selector<S, T> = (snapshot: S) => T;
export type IsEqual<T> = (a: T, b: T) => boolean;

const identity = <T>(v: T): T => v;

/**
 * `useSyncExternalStore` with a memoised selector (the same contract as React's
 * `use-sync-external-store/with-selector`, kept here so the package's only runtime
 * dependency is React itself).
 *
 * `subscribe` must be stable across renders (a new function resubscribes). `selector` and
 * `isEqual` may be inline functions.
 */
export function useSelected<S, T = S>(
  subscribe: Subscribe,
  getSnapshot: () => S,
  selector?: Selector<S, T>,
  isEqual: IsEqual<T> = Object.is,
): T {
  // The last value this component rendered: a new inline selector (every render) must still
  // compare against it, or each render would produce a "new" value.
  const rendered = useRef<{ value: T } | null>(null);
  const select = (selector ?? identity) as Selector<S, T>;

  const getSelection = useMemo(() => {
    let memo: { snapshot: S; value: T } | null = null;
    return (): T => {
      const snapshot = getSnapshot();
      if (memo !== null && Object.is(memo.snapshot, snapshot)) return memo.value;
      const next = select(snapshot);
      const prev = memo ?? rendered.current;
      const value = prev !== null && isEqual(prev.value, next) ? prev.value : next;
      memo = { snapshot, value };
      return value;
    };
    // `select`/`isEqual` are usually inline: recomputing this closure per render is cheap and
    // keeps the selector current; `rendered` carries equality across the recomputation.
  }, [getSnapshot, select, isEqual]);

  const value = useSyncExternalStore(subscribe, getSelection, getSelection);
  useEffect(() => {
    rendered.current = { value };
  }, [value]);
  return value;
}

/**
 * Equality for selector results that are arrays or plain objects: equal when they have the
 * same keys (or length) and `Object.is`-equal values one level deep.
 * `useOthers((o) => o.map((m) => m.userId), shallow)` re-renders only when the list of ids changes.
 */
export function shallow<T>(a: T, b: T): boolean {
  if (Object.is(a, b)) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  if (Array.isArray(a) && Array.isArray(b)) {
    if (a.length !== b.length) return false;
    for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
    return true;
  }
  if (a instanceof Map && b instanceof Map) {
    if (a.size !== b.size) return false;
    for (const [k, v] of a) if (!b.has(k) || !Object.is(v, b.get(k))) return false;
    return true;
  }
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  for (const k of ka) {
    if (!Object.prototype.hasOwnProperty.call(b, k)) return false;
    if (!Object.is((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k])) return false;
  }
  return true;
}
