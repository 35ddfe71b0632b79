// The Socket.IO 4 peer of lockstep's side-by-side benchmark (loadtest/side-by-side.sh,
// driven by `lockstep-load fanout --target socketio`). It does what an app on Socket.IO would
// do for live cursors and nothing more:
//   "join" (room, ack?)  -> socket.join(room), then ack("ok") so the driver knows it is in;
//   "cursor" (data)      -> socket.to(data.room).emit("cursor", data): the room's other members.
// With REDIS_URL set, @socket.io/redis-adapter fans events out between nodes over Redis pub/sub.
// WebSocket transport only (no long-polling upgrade dance) and no per-message deflate, like the
// other two systems. Environment: PORT (default 3000), HOST (127.0.0.1), REDIS_URL.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || "127.0.0.1";

async function main() {
  const httpServer = http.createServer((req, res) => {
    // A readiness probe for the benchmark script.
    if (req.url === "/healthz") {
      res.writeHead(200, { "content-type": "text/plain" });
      res.end("ok\n");
      return;
    }
    res.writeHead(404);
    res.end();
  });
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
  });

  if (process.env.REDIS_URL) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    pub.on("error", (e) => console.error("redis pub:", e.message));
    sub.on("error", (e) => console.error("redis sub:", e.message));
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
    console.error(`socket.io: redis adapter on ${process.env.REDIS_URL}`);
  }

  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      if (typeof room !== "string") return;
      socket.join(room);
      if (typeof ack === "function") ack("ok");
    });
    socket.on("cursor", (data) => {
      if (data && typeof data.room === "string") {
        socket.to(data.room).emit("cursor", data);
      }
    });
  });

  httpServer.listen(port, host, () => {
    console.error(`socket.io listening on ${host}:${port}`);
  });

  const stop = () => {
    io.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
