/** Loads the optional peer `@msgpack/msgpack` (the browser bundle swaps this module for one that refuses). */
import type { MsgpackCodec } from "./types.js";

export async function loadMsgpack(): Promise<MsgpackCodec> {
  const m = await import("@msgpack/msgpack");
  return { encode: (v) => m.encode(v), decode: (b) => m.decode(b) };
}
