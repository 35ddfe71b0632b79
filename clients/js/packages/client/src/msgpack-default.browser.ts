/** Browser-bundle stand-in for `msgpack-default.ts`: the bundle has no bare imports, so MessagePack needs the `msgpack` option. */
import { LockstepError } from "./errors.js";
import type { MsgpackCodec } from "./types.js";

export async function loadMsgpack(): Promise<MsgpackCodec> {
  throw new LockstepError("bad_options", 'encoding "msgpack" in the browser bundle needs the `msgpack` option ({ encode, decode })');
}
