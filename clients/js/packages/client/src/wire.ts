/**
 * Wire frames (snake_case, as docs/protocol.md describes them) and their conversion to the
 * SDK's camelCase types. MessagePack may decode u64 fields as `bigint`; `num` folds them to
 * numbers (tokens and times stay below 2^53 by the server's design).
 */
import type { Holder, LockInfo, Member, Role } from "./types.js";

export type Frame = { type: string; [k: string]: unknown };

export interface WireMember {
  user_id: string;
  session_id: string;
  name: string;
  avatar?: string | null;
  color: string;
  role: Role;
  focus?: string | null;
  state?: unknown;
  since: number;
}

export interface WireHolder {
  user_id: string;
  session_id: string;
  name: string;
  action: string;
  since: number;
  expires_at: number;
}

export interface WireLock {
  resource: string;
  holder: WireHolder;
  action: string;
  expires_at: number;
  token?: number;
}

export function num(v: unknown): number {
  if (typeof v === "number") return v;
  if (typeof v === "bigint") return Number(v);
  if (typeof v === "string" && v !== "") return Number(v);
  return 0;
}

export function toMember<P>(w: WireMember): Member<P> {
  const m: Member<P> = {
    userId: w.user_id,
    sessionId: w.session_id,
    name: w.name,
    color: w.color,
    role: w.role,
    since: num(w.since),
  };
  if (w.avatar != null) m.avatar = w.avatar;
  if (w.focus !== undefined) m.focus = w.focus;
  if (w.state !== undefined) m.state = w.state as P | null;
  return m;
}

export function toHolder(w: WireHolder): Holder {
  return {
    userId: w.user_id,
    sessionId: w.session_id,
    name: w.name,
    action: w.action,
    since: num(w.since),
    expiresAt: num(w.expires_at),
  };
}

export function toLockInfo(room: string, w: { resource: string; holder: WireHolder; action: string; expires_at: unknown }, mySession: string | null): LockInfo {
  const holder = toHolder(w.holder);
  return {
    room,
    resource: w.resource,
    action: w.action,
    expiresAt: num(w.expires_at),
    holder,
    mine: mySession !== null && holder.sessionId === mySession,
  };
}

/** Structural equality for JSON-like values (members' `state`, cursor selections). */
export function deepEqual(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  if (Array.isArray(a)) {
    const bb = b as unknown[];
    if (a.length !== bb.length) return false;
    for (let i = 0; i < a.length; i++) if (!deepEqual(a[i], bb[i])) return false;
    return true;
  }
  const ka = Object.keys(a as object);
  const kb = Object.keys(b as object);
  if (ka.length !== kb.length) return false;
  for (const k of ka) {
    if (!Object.prototype.hasOwnProperty.call(b, k)) return false;
    if (!deepEqual((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k])) return false;
  }
  return true;
}

/** Drops `undefined` fields, so neither codec sends them (MessagePack would send nil). */
export function compact<T extends Record<string, unknown>>(o: T): T {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) out[k] = v;
  return out as T;
}
