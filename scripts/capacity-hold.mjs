// Holds C idle WebSocket connections to one Warren node, spread over R rooms,
// for scripts/capacity: it opens them (each with its own user id and `?room=`,
// so each session's queue is bound before its `welcome`), prints `ready <n>`
// once every one has its welcome, and keeps them open, reading (Node's
// WebSocket answers Warren's pings), until its stdin closes. Then it closes
// them with 1000, so Warren deletes their queues at once instead of keeping
// them for the resume grace.
//
// node --experimental-websocket scripts/capacity-hold.mjs URL CONNECTIONS ROOMS PREFIX [CONCURRENCY]

const [url, connections, rooms, prefix, concurrency = "64"] = process.argv.slice(2);
const total = Number(connections);
const roomCount = Number(rooms);
if (!url || !(total > 0) || !(roomCount > 0) || !prefix) {
  console.error("usage: capacity-hold.mjs ws://ADDR/ws CONNECTIONS ROOMS PREFIX [CONCURRENCY]");
  process.exit(2);
}

const sockets = [];
let failed = 0;

// One connection: resolves once its `welcome` arrives, rejects if it closes or
// errors before that (a refusal is an HTTP status, which WebSocket reports as an
// error), or after 60 s.
function open(i) {
  const room = `${prefix}-r${i % roomCount}`;
  const socket = new WebSocket(`${url}?user=${prefix}-u${i}&room=${room}`);
  sockets.push(socket);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`connection ${i}: no welcome in 60 s`)), 60_000);
    socket.addEventListener("message", (event) => {
      if (typeof event.data === "string" && event.data.includes('"type":"welcome"')) {
        clearTimeout(timer);
        resolve();
      }
    });
    socket.addEventListener("error", () => {
      clearTimeout(timer);
      reject(new Error(`connection ${i}: error before welcome`));
    });
    socket.addEventListener("close", (event) => {
      clearTimeout(timer);
      reject(new Error(`connection ${i}: closed ${event.code} before welcome`));
    });
  });
}

const started = Date.now();
let next = 0;
let welcomed = 0;
async function worker() {
  while (next < total) {
    const i = next++;
    try {
      await open(i);
      welcomed++;
    } catch (e) {
      if (failed++ === 0) console.error(String(e));
    }
  }
}
await Promise.all(Array.from({ length: Number(concurrency) }, worker));
const secs = (Date.now() - started) / 1000;
console.log(`ready ${welcomed} failed ${failed} secs ${secs.toFixed(1)}`);

// Hold until whoever started us closes our stdin.
process.stdin.resume();
await new Promise((resolve) => process.stdin.on("end", resolve));
for (const socket of sockets) {
  if (socket.readyState === WebSocket.OPEN) socket.close(1000);
}
// Give the close frames time to leave before the process exits.
await new Promise((resolve) => setTimeout(resolve, 3000));
console.log("closed");
process.exit(0);
