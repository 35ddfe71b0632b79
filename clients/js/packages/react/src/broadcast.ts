/**
 * `useBroadcast`: send one broadcast event to the room and, optionally, listen to it.
 * Broadcasts are a stream of events, not state, so listening is an effect subscription rather
 * than `useSyncExternalStore`.
 */
import { useCallback, useEffect, useRef } from "react";
import type { BroadcastEvent, Json } from "@lockstep/client";
import { useRoom } from "./providers.js";
import { handled } from "./presence.js";

/**
 * Returns a stable function that broadcasts `event` with its `data` to the *other* members
 * (the server does not echo it to the sender). With `handler`, also calls it for every
 * `event` broadcast by others; the latest `handler` is used without resubscribing.
 *
 * ```ts
 * const sendChat = useBroadcast<Events, "chat">("chat", (e) => append(e.from.name, e.data.text));
 * sendChat({ text: "hi" });
 * ```
 */
export function useBroadcast<
  B extends Record<string, Json> = Record<string, Json>,
  K extends keyof B & string = keyof B & string,
>(event: K, handler?: (e: BroadcastEvent<K, B[K]>) => void): (data: B[K]) => Promise<void> {
  const room = useRoom<Json, B>();
  const latest = useRef(handler);
  useEffect(() => {
    latest.current = handler;
  });
  const listening = handler !== undefined;

  useEffect(() => {
    if (!listening) return undefined;
    return room.on("broadcast", (e: BroadcastEvent) => {
      if (e.event === event) latest.current?.(e as BroadcastEvent<K, B[K]>);
    });
  }, [room, event, listening]);

  return useCallback((data: B[K]) => handled(room.broadcast(event, data)), [room, event]);
}
