// Compile-time checks of the public types (run by `npm run typecheck`): generics for presence
// state and broadcast events, and the exact names of sdk-api.md.
import { Lockstep, LockstepError, type Lock, type LockInfo, type Member, type Status } from "../../src/index.js";

type Presence = { tool: "pen" | "eraser"; color?: string };
type Events = { chat: { text: string }; seek: { t: number } };

declare const WS: new (url: string, protocols?: string | string[]) => WebSocket;
const client = new Lockstep<Presence, Events>({ url: "http://x", getToken: () => "t", WebSocket: WS, encoding: "msgpack" });
const s: Status = client.status;
const room = client.room("scene:1");
void room.join({ state: { tool: "pen" }, focus: "segment:1" });
const m: readonly Member<Presence>[] = room.members;
const tool: "pen" | "eraser" | undefined = room.self?.state?.tool;
void room.broadcast("chat", { text: "hi" });
// @ts-expect-error: wrong payload for the event
void room.broadcast("seek", { text: "x" });
// @ts-expect-error: unknown event
void room.broadcast("nope", {});
room.on("broadcast", (e) => {
  if (e.event === "seek") {
    const t: number = e.data.t;
    void t;
  }
});
room.on("members", (ms) => ms.map((x) => x.state?.tool));
room.on("cursors", (c) => c.get("s")?.x);
room.locks.on("change", (list: readonly LockInfo[]) => list[0]?.holder.name);
async function locks(signal: AbortSignal): Promise<number> {
  const lock: Lock = await room.locks.acquire("segment:1", { action: "trim", wait: true, signal, autoExtend: { everyMs: 1000 }, onQueued: (q) => q.queuePosition });
  lock.on("lost", (r) => r === "forced");
  lock.on("change", (l) => l.expiresAt);
  await lock.extend(1000);
  await lock.release();
  return lock.token;
}
try {
  void locks(new AbortController().signal);
} catch (e) {
  if (e instanceof LockstepError && e.code === "lock_held") void e.holder?.name;
}
client.on("closed", (e) => e.willReconnect);
client.on("error", (e) => e.closeCode);
void s;
void m;
void tool;
