/**
 * `createLockstepHooks<P, B>()`: the same hooks with the app's presence-state type `P` and
 * broadcast event map `B` bound once, so components need no type arguments (Liveblocks'
 * `createRoomContext` pattern). Purely a typing aid: the functions are the plain hooks.
 */
import type { BroadcastEvent, Json, Lockstep, Member, Room } from "@lockstep/client";
import { useBroadcast } from "./broadcast.js";
import { useMembers, useMyPresence, useOthers, useSelf, type MyPresence, type UpdateMyPresence } from "./presence.js";
import { RoomProvider, useClient, useRoom, type RoomProviderProps } from "./providers.js";
import type { IsEqual } from "./store.js";
import type { ReactNode } from "react";

/** The hooks whose types depend on the app's presence state `P` and broadcast events `B`. */
export interface LockstepHooks<P, B extends Record<string, Json>> {
  RoomProvider: (props: RoomProviderProps<P>) => ReactNode;
  useClient: () => Lockstep<P, B>;
  useRoom: () => Room<P, B>;
  useMembers: {
    (): readonly Member<P>[];
    <T>(selector: (members: readonly Member<P>[]) => T, isEqual?: IsEqual<T>): T;
  };
  useOthers: {
    (): readonly Member<P>[];
    <T>(selector: (others: readonly Member<P>[]) => T, isEqual?: IsEqual<T>): T;
  };
  useSelf: {
    (): Member<P> | null;
    <T>(selector: (self: Member<P> | null) => T, isEqual?: IsEqual<T>): T;
  };
  useMyPresence: () => [MyPresence<P>, UpdateMyPresence<P>];
  useBroadcast: <K extends keyof B & string>(
    event: K,
    handler?: (e: BroadcastEvent<K, B[K]>) => void,
  ) => (data: B[K]) => Promise<void>;
}

/**
 * ```ts
 * type State = { typing: boolean };
 * type Events = { chat: { text: string } };
 * export const { RoomProvider, useOthers, useMyPresence, useBroadcast } = createLockstepHooks<State, Events>();
 * ```
 */
export function createLockstepHooks<
  P = Json,
  B extends Record<string, Json> = Record<string, Json>,
>(): LockstepHooks<P, B> {
  return {
    RoomProvider: RoomProvider as LockstepHooks<P, B>["RoomProvider"],
    useClient: useClient as LockstepHooks<P, B>["useClient"],
    useRoom: useRoom as LockstepHooks<P, B>["useRoom"],
    useMembers: useMembers as LockstepHooks<P, B>["useMembers"],
    useOthers: useOthers as LockstepHooks<P, B>["useOthers"],
    useSelf: useSelf as LockstepHooks<P, B>["useSelf"],
    useMyPresence: useMyPresence as LockstepHooks<P, B>["useMyPresence"],
    useBroadcast: useBroadcast as LockstepHooks<P, B>["useBroadcast"],
  };
}
