/**
 * `@lockstep/client`: presence, cursors, broadcasts and fenced locks over one WebSocket to a
 * lockstep gateway. See README.md for the API and docs/protocol.md for the wire protocol.
 */
export { Lockstep, DEAD_SOCKET_CODE, type ClientEvents, type Session } from "./client.js";
export { LockstepError, type LockstepErrorFields } from "./errors.js";
export { Room, type RoomEvents, type RoomBroadcast, type PresenceEvent } from "./room.js";
export { RoomLocks } from "./locks.js";
export { backoffDelay } from "./backoff.js";
export type {
  AcquireOptions,
  BroadcastEvent,
  ClosedEvent,
  Cursor,
  Holder,
  Json,
  Lock,
  LockInfo,
  LockstepOptions,
  LostReason,
  Member,
  MsgpackCodec,
  Role,
  Status,
  Unsubscribe,
  User,
  WebSocketConstructor,
  WebSocketLike,
} from "./types.js";
