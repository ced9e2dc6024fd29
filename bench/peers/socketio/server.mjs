// The Socket.IO peer that `warren-bench --target socketio` measures: Socket.IO 4
// with the Redis adapter, so several nodes share rooms as Warren's share them
// through RabbitMQ. Start one process per node; all with the same REDIS_KEY form
// one cluster.
//
// Settings are the best honest ones for this load: the websocket transport only
// (no HTTP long-polling, no upgrade), no per-message compression, no HTTP
// compression, bufferutil for ws's masking, and the Redis adapter (its default
// options). Each socket joins the room named in its connect `auth` before the
// CONNECT reply goes out, so that reply is its subscription (like Warren's
// `welcome`). A `message` event is broadcast to the whole room, the sender
// included (as Warren does), as the document Warren sends: the server stamps
// `id`, `from` and `ts`, as Warren does.
//
// Environment: PORT (0: a free one; default 3000), REDIS_URL (default
// redis://127.0.0.1:6379), REDIS_KEY (the adapter's channel prefix; default
// "socket.io"), NODE_ID (default n<pid>). Prints "listening on <port>" when
// ready. SIGTERM/SIGINT close it.
import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

const port = Number(process.env.PORT ?? 3000);
const redisUrl = process.env.REDIS_URL ?? "redis://127.0.0.1:6379";
const key = process.env.REDIS_KEY ?? "socket.io";
const nodeId = process.env.NODE_ID ?? `n${process.pid}`;

const pub = createClient({ url: redisUrl });
const sub = pub.duplicate();
await Promise.all([pub.connect(), sub.connect()]);

const httpServer = createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  perMessageDeflate: false,
  httpCompression: false,
  serveClient: false,
  adapter: createAdapter(pub, sub, { key }),
});

let sent = 0;
io.on("connection", (socket) => {
  const room = String(socket.handshake.auth?.room ?? "lobby");
  const from = String(socket.handshake.auth?.user ?? socket.id);
  socket.join(room);
  socket.on("message", (text) => {
    if (typeof text !== "string") return;
    io.to(room).emit("message", {
      type: "message",
      id: `${nodeId}-${(sent++).toString(16)}`,
      room,
      from,
      text,
      ts: Date.now(),
    });
  });
});

httpServer.listen(port, "127.0.0.1", () => {
  console.log(`listening on ${httpServer.address().port}`);
});

const stop = () => {
  io.close();
  Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
