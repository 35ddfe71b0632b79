/**
 * `@lockstep/react`: React bindings for `@lockstep/client`. Providers own the client and the
 * room membership; hooks read the client's snapshots through `useSyncExternalStore`.
 */
export {
  LockstepProvider,
  RoomProvider,
  useClient,
  useRoom,
  type LockstepProviderProps,
  type RoomProviderProps,
  type Presence,
} from "./providers.js";
export {
  useStatus,
  useMembers,
  useOthers,
  useSelf,
  useMyPresence,
  useCursors,
  useMoveCursor,
  type MyPresence,
  type UpdateMyPresence,
} from "./presence.js";
export { useLock, useLocks, type AcquireOptions, type QueuedInfo, type UseLockResult } from "./locks.js";
export { useBroadcast } from "./broadcast.js";
export { createLockstepHooks, type LockstepHooks } from "./typed.js";
export { shallow, type IsEqual } from "./store.js";
