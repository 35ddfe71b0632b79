/**
 * The request table: u32 ids (wrapping, skipping ids still in use), one timeout per request
 * counted from the call, and the offline queue. A request made while the socket is down stays
 * here unsent until the next `welcome`; the table (sent and unsent together) is bounded by
 * `maxPendingRequests`, past which a call rejects at once with `queue_full`.
 */
import { LockstepError } from "./errors.js";
import type { Frame } from "./wire.js";

/** What a request's error hook decided about an `error` frame. */
export type ErrorVerdict = "reject" | "keep" | "resolve";

export interface RequestOptions {
  /** `null`: no client-side timeout (a queued lock wait: the server times it out). */
  timeoutMs?: number | null;
  /** Inspect an `error` frame before it rejects the request. */
  onError?: (frame: Frame) => ErrorVerdict;
  /** Re-send after a dropped socket (default true); false rejects with `disconnected` instead. */
  resend?: boolean;
  /** The session the request belongs to (a lock handle's extend/release): when a new session replaces it, settle the request this way instead of re-sending it. */
  session?: string;
  onSessionEnd?: "resolve" | "reject";
}

export interface Pending {
  readonly id: number;
  readonly msg: Record<string, unknown>;
  readonly opts: RequestOptions;
  sent: boolean;
  timer: ReturnType<typeof setTimeout> | null;
  resolve(frame: Frame): void;
  reject(err: LockstepError): void;
}

const MAX_ID = 0xffff_ffff;

export class RequestTable {
  private next = 1;
  private readonly pending = new Map<number, Pending>();

  constructor(
    private readonly limit: number,
    private readonly defaultTimeoutMs: number,
    private readonly onTimeout: (p: Pending) => void,
  ) {}

  get size(): number {
    return this.pending.size;
  }

  /** Registers a request; the caller sends it now (if online) and marks it `sent`. */
  add(msg: Record<string, unknown>, opts: RequestOptions = {}): { pending: Pending; promise: Promise<Frame> } | LockstepError {
    if (this.pending.size >= this.limit) {
      return new LockstepError("queue_full", `${this.pending.size} requests are pending (maxPendingRequests)`);
    }
    const id = this.allocate();
    let resolve!: (f: Frame) => void;
    let reject!: (e: LockstepError) => void;
    const promise = new Promise<Frame>((res, rej) => {
      resolve = res;
      reject = rej;
    });
    const p: Pending = {
      id,
      msg: { ...msg, id },
      opts,
      sent: false,
      timer: null,
      resolve: (f) => {
        this.finish(p);
        resolve(f);
      },
      reject: (e) => {
        this.finish(p);
        reject(e);
      },
    };
    const timeout = opts.timeoutMs === undefined ? this.defaultTimeoutMs : opts.timeoutMs;
    if (timeout !== null) {
      p.timer = setTimeout(() => {
        p.timer = null;
        if (this.pending.get(id) !== p) return;
        this.onTimeout(p);
        p.reject(new LockstepError("timeout", `no answer to ${String(msg.type)} within ${timeout} ms`, { requestId: id }));
      }, timeout);
    }
    this.pending.set(id, p);
    return { pending: p, promise };
  }

  get(id: unknown): Pending | undefined {
    return typeof id === "number" ? this.pending.get(id) : undefined;
  }

  /** Stops the client-side timeout (a lock wait that the server now times). */
  clearTimer(p: Pending): void {
    if (p.timer) clearTimeout(p.timer);
    p.timer = null;
  }

  all(): Pending[] {
    return [...this.pending.values()];
  }

  rejectAll(make: (p: Pending) => LockstepError): void {
    for (const p of this.all()) p.reject(make(p));
  }

  private finish(p: Pending): void {
    if (p.timer) clearTimeout(p.timer);
    p.timer = null;
    if (this.pending.get(p.id) === p) this.pending.delete(p.id);
  }

  private allocate(): number {
    // At most `limit` ids are in use, so this ends quickly.
    for (;;) {
      const id = this.next;
      this.next = id >= MAX_ID ? 1 : id + 1;
      if (!this.pending.has(id)) return id;
    }
  }
}

/** The `LockstepError` an `error` frame stands for. */
export function errorFromFrame(f: Frame, toHolder: (h: any) => unknown): LockstepError {
  const code = typeof f.code === "string" ? f.code : "internal";
  const message = typeof f.message === "string" ? f.message : code;
  return new LockstepError(code, message, {
    holder: f.holder ? (toHolder(f.holder) as any) : undefined,
    estimatedWaitMs: f.estimated_wait_ms != null ? Number(f.estimated_wait_ms) : undefined,
    queuePosition: f.queue_position != null ? Number(f.queue_position) : undefined,
    resource: typeof f.resource === "string" ? f.resource : undefined,
    requestId: typeof f.id === "number" ? f.id : undefined,
  });
}
