// Compile-only check (`tsc -p test/types`): the README's example and the typed hooks against
// the built declarations. A type error here fails `npm test`.
import { Lockstep, type LockstepError } from "@lockstep/client";
import {
  LockstepProvider,
  RoomProvider,
  createLockstepHooks,
  shallow,
  useBroadcast,
  useCursors,
  useLock,
  useLocks,
  useMembers,
  useMyPresence,
  useOthers,
  useSelf,
  useStatus,
} from "@lockstep/react";

declare function fetchToken(): Promise<string>;
const client = new Lockstep({ url: "wss://collab.example.com", getToken: fetchToken });

export function App() {
  return (
    <LockstepProvider client={client}>
      <RoomProvider room="scene:42" initialPresence={{ focus: "segment:42-1" }}>
        <Scene />
      </RoomProvider>
    </LockstepProvider>
  );
}

function Scene() {
  const status: "connecting" | "connected" | "reconnecting" | "disconnected" = useStatus();
  const names: string[] = useOthers((others) => others.map((m) => m.name), shallow);
  const count: number = useMembers((m) => m.length);
  const me = useSelf();
  const [presence, updateMe] = useMyPresence();
  const { info, lock, acquire, release, pending, queued, error } = useLock("segment:42-1");
  const err: LockstepError | null = error;
  const locks = useLocks();
  const cursorCount: number = useCursors((c) => c.size);
  const sendChat = useBroadcast("chat", (e) => console.log(e.from.name, e.data));
  return (
    <div>
      <p>
        {status} {names.join(", ")} {count} {me?.name} {presence.focus} {locks.length} {cursorCount}
      </p>
      <button onClick={() => updateMe({ focus: "segment:42-2" })}>look</button>
      {info && !info.mine && <p>{info.holder.name}</p>}
      {lock ? (
        <button onClick={() => release()}>release {lock.token}</button>
      ) : (
        <button disabled={pending} onClick={() => acquire({ action: "approve", wait: true })}>
          {queued ? `#${queued.queuePosition}` : "approve"}
        </button>
      )}
      {err && <p>{err.code}</p>}
      <button onClick={() => sendChat({ text: "hi" })}>wave</button>
    </div>
  );
}

// Typed hooks: presence state and broadcast events bound once.
type State = { typing: boolean };
type Events = { chat: { text: string }; playhead: { t: number } };
const typed = createLockstepHooks<State, Events>();

export function Typed() {
  const typing: boolean[] = typed.useOthers((o) => o.map((m) => m.state?.typing ?? false));
  const [me, update] = typed.useMyPresence();
  const t: boolean | undefined = me.state?.typing;
  void update({ state: { typing: true } });
  // @ts-expect-error: state must match State
  void update({ state: { typing: "yes" } });
  const seek = typed.useBroadcast("playhead", (e) => {
    const at: number = e.data.t;
    void at;
  });
  void seek({ t: 1.5 });
  // @ts-expect-error: playhead data is { t: number }
  void seek({ text: "no" });
  // @ts-expect-error: not an event of Events
  typed.useBroadcast("nope");
  return (
    <typed.RoomProvider room="scene:1" initialPresence={{ state: { typing: false } }}>
      {typing.length} {String(t)}
    </typed.RoomProvider>
  );
}
