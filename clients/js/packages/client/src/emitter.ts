/** A minimal typed event emitter; a throwing listener is reported, never breaks the SDK's own state updates. */
import type { Unsubscribe } from "./types.js";

type Listener = (arg: any) => void;

export class Emitter<Events extends { [K in keyof Events]: (arg: any) => void }> {
  private listeners = new Map<keyof Events, Set<Listener>>();

  on<K extends keyof Events>(event: K, cb: Events[K]): Unsubscribe {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(cb);
    return () => this.off(event, cb);
  }

  off<K extends keyof Events>(event: K, cb: Events[K]): void {
    this.listeners.get(event)?.delete(cb);
  }

  protected emit<K extends keyof Events>(event: K, arg: Parameters<Events[K]>[0]): void {
    const set = this.listeners.get(event);
    if (!set) return;
    for (const cb of [...set]) {
      try {
        cb(arg);
      } catch (e) {
        report(e);
      }
    }
  }
}

/** Surfaces a listener's exception like an uncaught one, without unwinding the caller. */
export function report(e: unknown): void {
  const g = globalThis as { reportError?: (e: unknown) => void };
  if (typeof g.reportError === "function") g.reportError(e);
  else setTimeout(() => {
    throw e;
  }, 0);
}
