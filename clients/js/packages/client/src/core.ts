/** The part of the client that rooms and locks use (kept as an interface so those modules do not import the client). */
import type { LockstepError } from "./errors.js";
import type { RequestOptions } from "./requests.js";
import type { Frame } from "./wire.js";

export interface Core {
  readonly sessionId: string | null;
  readonly cursorThrottleMs: number;
  _online(): boolean;
  _request(msg: Record<string, unknown>, opts?: RequestOptions): Promise<Frame>;
  /** Like `_request`, also giving the request id (for abort). */
  _start(msg: Record<string, unknown>, opts?: RequestOptions): { id: number; promise: Promise<Frame> };
  /** Rejects a pending request locally; false if it was no longer pending. */
  _cancel(id: number, err: LockstepError): boolean;
  /** Stops a pending request's client-side timeout. */
  _untime(id: number): void;
  /** Sends an id-less frame now if online; false if dropped. */
  _send(msg: Record<string, unknown>): boolean;
  /** A grant that arrives for this (timed-out or aborted) acquire is released at once. */
  _noteLateAcquire(id: number, room: string, resource: string): void;
  _reportError(e: LockstepError): void;
  _setShareCursor(share: boolean): Promise<void>;
}
