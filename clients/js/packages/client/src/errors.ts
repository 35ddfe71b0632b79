/** `LockstepError`: every rejection and `"error"` event of the SDK carries one, with a stable `code`. */
import type { Holder } from "./types.js";

export interface LockstepErrorFields {
  holder?: Holder;
  estimatedWaitMs?: number;
  queuePosition?: number;
  resource?: string;
  closeCode?: number;
  requestId?: number;
}

export class LockstepError extends Error {
  /** A server code from docs/protocol.md (`lock_held`, `forbidden`, …) or an SDK code (`timeout`, `aborted`, `disconnected`, `queue_full`, `closed`, `bad_options`). */
  readonly code: string;
  holder?: Holder;
  estimatedWaitMs?: number;
  queuePosition?: number;
  resource?: string;
  closeCode?: number;
  requestId?: number;

  constructor(code: string, message: string, fields: LockstepErrorFields = {}) {
    super(message);
    this.name = "LockstepError";
    this.code = code;
    for (const [k, v] of Object.entries(fields)) {
      if (v !== undefined) (this as Record<string, unknown>)[k] = v;
    }
  }
}
