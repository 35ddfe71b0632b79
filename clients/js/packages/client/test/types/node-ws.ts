// Node users pass `ws`'s WebSocket: it must type-check as the `WebSocket` option.
import WebSocket from "ws";
import { Lockstep } from "../../src/index.js";

const client = new Lockstep({ url: "ws://127.0.0.1:8080", getToken: async () => "t", WebSocket });
void client.connect();
