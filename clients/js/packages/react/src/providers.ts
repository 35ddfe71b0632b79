/**
 * `LockstepProvider` and `RoomProvider`: which client and which room the hooks below them
 * talk to, and the lifecycle the providers own (connecting and closing a client they created,
 * joining and leaving a room).
 *
 * Joins are reference-counted per `Room` object, and both leaving and closing are deferred by
 * one macrotask: React 18+ StrictMode mounts, unmounts and mounts again synchronously in
 * development, and two `RoomProvider`s of one room may be mounted at once. With the deferral a
 * StrictMode double mount sends one `join` and no `leave`, so peers never see this member
 * flap, and the room is left once, when its last provider goes.
 */
import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useMemo,
  useRef,
  useState,
  type ReactNode,
} from "react";
import { Lockstep, type Json, type LockstepOptions, type Room } from "@lockstep/client";

/** What the app sets with `RoomProvider`'s `initialPresence` (also `useMyPresence` before the join). */
export interface Presence<P = Json> {
  focus?: string | null;
  state?: P | null;
}

// `any` is deliberate: a context cannot carry the app's generics; each hook states its own.
type AnyClient = Lockstep<any, any>;
type AnyRoom = Room<any, any>;

export const ClientContext = createContext<AnyClient | null>(null);

interface RoomContextValue {
  room: AnyRoom;
  initialPresence: Presence<unknown>;
}
export const RoomContext = createContext<RoomContextValue | null>(null);

/** Props of {@link LockstepProvider}: either an app-owned `client`, or `options` to create one. */
export type LockstepProviderProps =
  | {
      /** A client the app created. The provider never closes it. */
      client: AnyClient;
      options?: undefined;
      /** Call `client.connect()` on mount when the client is `disconnected`. Default `true`. */
      connect?: boolean;
      children?: ReactNode;
    }
  | {
      client?: undefined;
      /** Options for a client the provider creates on mount, connects, and closes on unmount. Read once. */
      options: LockstepOptions;
      connect?: boolean;
      children?: ReactNode;
    };

/** Makes a `Lockstep` client available to `useClient` and to every `RoomProvider` below. */
export function LockstepProvider(props: LockstepProviderProps): ReactNode {
  const { client: given, options, connect = true, children } = props;
  if (!given && !options) throw new Error("LockstepProvider needs a `client` or an `options` prop");
  // Created during render but inert until connected: a client that StrictMode's discarded
  // render made is never connected and needs no cleanup.
  const [owned] = useState<AnyClient | null>(() => (given ? null : new Lockstep(options!)));
  const client = (given ?? owned)!;

  const closeTimer = useRef<ReturnType<typeof setTimeout> | null>(null);
  useEffect(() => {
    if (closeTimer.current !== null) {
      // StrictMode's immediate re-mount: keep the connection.
      clearTimeout(closeTimer.current);
      closeTimer.current = null;
    }
    if (connect && client.status === "disconnected") {
      // A failure is visible as `useStatus() === "disconnected"` and on the client's "error"
      // event; the promise itself has nobody to report to.
      client.connect().catch(() => {});
    }
    if (client !== owned) return undefined;
    return () => {
      closeTimer.current = setTimeout(() => {
        closeTimer.current = null;
        client.close();
      }, 0);
    };
  }, [client, owned, connect]);

  return createElement(ClientContext.Provider, { value: client }, children);
}

/** Props of {@link RoomProvider}. */
export interface RoomProviderProps<P = Json> {
  /** The room to join, an entity such as `scene:42`. */
  room: string;
  /** Presence sent with the `join` (focus and state). Read when the room is joined, not after. */
  initialPresence?: Presence<P>;
  /** Called when the join fails (`forbidden`, `room_full`, `too_large`, …). Default: `console.error`. */
  onError?: (error: Error) => void;
  children?: ReactNode;
}

interface JoinEntry {
  count: number;
  joined: boolean;
  leaveTimer: ReturnType<typeof setTimeout> | null;
}
// Per Room object, so two clients' rooms of the same name are counted apart.
const joins = new WeakMap<AnyRoom, JoinEntry>();

function retain(room: AnyRoom, presence: Presence<unknown>, onError: (e: Error) => void): void {
  let entry = joins.get(room);
  if (!entry) {
    entry = { count: 0, joined: false, leaveTimer: null };
    joins.set(room, entry);
  }
  entry.count += 1;
  if (entry.leaveTimer !== null) {
    clearTimeout(entry.leaveTimer);
    entry.leaveTimer = null;
  }
  if (entry.joined) return;
  entry.joined = true;
  const opts: { state?: unknown; focus?: string | null } = {};
  if (presence.state !== undefined) opts.state = presence.state;
  if (presence.focus !== undefined) opts.focus = presence.focus;
  room.join(opts).catch((e: unknown) => {
    // Leaving before the join was answered rejects the join with "disconnected": not an error.
    if (entry!.joined) onError(e instanceof Error ? e : new Error(String(e)));
  });
}

function release(room: AnyRoom): void {
  const entry = joins.get(room);
  if (!entry) return;
  entry.count -= 1;
  if (entry.count > 0 || entry.leaveTimer !== null) return;
  entry.leaveTimer = setTimeout(() => {
    entry.leaveTimer = null;
    if (entry.count > 0 || !entry.joined) return;
    entry.joined = false;
    // A closed client has nothing to leave.
    room.leave().catch(() => {});
  }, 0);
}

/**
 * Joins `room` on mount and leaves it on unmount (or when `room` changes); the hooks below it
 * (`useMembers`, `useLock`, …) read that room. Needs a {@link LockstepProvider} above.
 */
export function RoomProvider<P = Json>(props: RoomProviderProps<P>): ReactNode {
  const { room: name, initialPresence, onError, children } = props;
  const client = useClient();
  const room = useMemo(() => client.room(name), [client, name]);

  // Read at join time only, like Liveblocks' initialPresence: later changes go through
  // useMyPresence's update, not a re-join.
  const initial = useRef<Presence<unknown>>(initialPresence ?? {});
  const errorHandler = useRef(onError);
  useEffect(() => {
    errorHandler.current = onError;
  });

  useEffect(() => {
    retain(room, initial.current, (e) => (errorHandler.current ?? console.error)(e));
    return () => release(room);
  }, [room]);

  const value = useMemo<RoomContextValue>(() => ({ room, initialPresence: initial.current }), [room]);
  return createElement(RoomContext.Provider, { value }, children);
}

/** The `Lockstep` client of the nearest {@link LockstepProvider}. */
export function useClient<P = Json, B extends Record<string, Json> = Record<string, Json>>(): Lockstep<P, B> {
  const client = useContext(ClientContext);
  if (!client) throw new Error("useClient: no <LockstepProvider> above this component");
  return client as Lockstep<P, B>;
}

/** The `Room` of the nearest {@link RoomProvider}. */
export function useRoom<P = Json, B extends Record<string, Json> = Record<string, Json>>(): Room<P, B> {
  const ctx = useContext(RoomContext);
  if (!ctx) throw new Error("useRoom: no <RoomProvider> above this component");
  return ctx.room as Room<P, B>;
}

/** The `initialPresence` of the nearest {@link RoomProvider} (for `useMyPresence` before the join). */
export function useInitialPresence<P>(): Presence<P> {
  const ctx = useContext(RoomContext);
  if (!ctx) throw new Error("useMyPresence: no <RoomProvider> above this component");
  return ctx.initialPresence as Presence<P>;
}
