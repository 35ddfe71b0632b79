/**
 * Frame encoding for the two subprotocols: JSON text frames (`lockstep.v1.json`) and
 * MessagePack binary frames (`lockstep.v1.msgpack`, rmp-serde maps with string keys).
 */
import { LockstepError } from "./errors.js";
import type { MsgpackCodec } from "./types.js";
import type { Frame } from "./wire.js";

export interface Codec {
  readonly protocol: string;
  encode(msg: Record<string, unknown>): string | Uint8Array;
  decode(data: unknown): Frame;
}

const utf8 = new TextDecoder();

function bytes(data: unknown): Uint8Array | null {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  return null;
}

function frame(v: unknown): Frame {
  if (typeof v !== "object" || v === null || typeof (v as Frame).type !== "string") {
    throw new LockstepError("malformed", "server frame is not an object with a type");
  }
  return v as Frame;
}

export const jsonCodec: Codec = {
  protocol: "lockstep.v1.json",
  encode: (msg) => JSON.stringify(msg),
  decode(data) {
    if (typeof data === "string") return frame(JSON.parse(data));
    const b = bytes(data);
    if (b) return frame(JSON.parse(utf8.decode(b)));
    throw new LockstepError("malformed", "unexpected frame data");
  },
};

/** Folds `bigint` (a decoder configured for 64-bit integers) into numbers, in place. */
function unbig(v: unknown): unknown {
  if (typeof v === "bigint") return Number(v);
  if (Array.isArray(v)) {
    for (let i = 0; i < v.length; i++) v[i] = unbig(v[i]);
  } else if (v !== null && typeof v === "object" && !(v instanceof Uint8Array)) {
    const o = v as Record<string, unknown>;
    for (const k of Object.keys(o)) o[k] = unbig(o[k]);
  }
  return v;
}

export function msgpackCodec(mp: MsgpackCodec): Codec {
  return {
    protocol: "lockstep.v1.msgpack",
    encode: (msg) => mp.encode(msg),
    decode(data) {
      const b = bytes(data);
      if (!b) throw new LockstepError("malformed", "expected a binary frame");
      return frame(unbig(mp.decode(b)));
    },
  };
}
