// One flooder and one quiet client in a room: the quiet client's round-trip
// latency (send → its own copy back), with and without the flood.
//
//   node --experimental-websocket bench/scripts/flood.mjs ws://127.0.0.1:8080/ws [seconds] [flood|quiet]
//
// "flood": a second client sends as fast as its socket takes frames.
// Prints one JSON line: samples, p50/p99/max in ms, and what the flooder sent.
const [url, secondsArg = '10', mode = 'flood'] = process.argv.slice(2);
if (!url) { console.error('usage: flood.mjs <ws-url> [seconds] [flood|quiet]'); process.exit(2); }
const seconds = Number(secondsArg);
const room = `flood-${Math.random().toString(16).slice(2, 10)}`;

function open(user) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}?room=${room}&user=${user}`);
    ws.onmessage = (ev) => {
      const f = JSON.parse(ev.data);
      if (f.type === 'welcome') resolve(ws);
    };
    ws.onerror = reject;
  });
}

const quiet = await open(`quiet-${room}`);
const sent = new Map();
const rtts = [];
quiet.onmessage = (ev) => {
  const f = JSON.parse(ev.data);
  if (f.type === 'message' && f.from === `quiet-${room}`) {
    const t0 = sent.get(f.text);
    if (t0 !== undefined) rtts.push(performance.now() - t0);
  }
};
let flooder = null;
// What the flooder sent, and the close code it got (the server's log says
// why: a limited flooder ends `Abusive`, close 1008).
const flood = { sent: 0 };
if (mode === 'flood') {
  flooder = await open(`flooder-${room}`);
  flooder.onclose = (ev) => { flood.closed = ev.code; };
  const pump = () => {
    if (!flooder || flooder.readyState !== 1) return;
    // Keep the socket's buffer shallow: as fast as it drains, no faster.
    let burst = 0;
    while (flooder.bufferedAmount < 64 * 1024 && burst++ < 1000) {
      flooder.send(JSON.stringify({ type: 'message', text: 'x'.repeat(100), ref: `f${flood.sent++}` }));
    }
    setImmediate(pump);
  };
  pump();
}
let n = 0;
const timer = setInterval(() => {
  const text = `q${n++}`;
  sent.set(text, performance.now());
  quiet.send(JSON.stringify({ type: 'message', text }));
}, 50);
await new Promise((r) => setTimeout(r, seconds * 1000));
clearInterval(timer);
await new Promise((r) => setTimeout(r, 1000));
const f = flooder; flooder = null;
if (f) f.close();
quiet.close();
rtts.sort((a, b) => a - b);
const pct = (p) => rtts.length ? rtts[Math.min(rtts.length - 1, Math.floor(p * rtts.length))] : null;
console.log(JSON.stringify({
  mode, samples: rtts.length, sent: n,
  p50_ms: pct(0.5) && +pct(0.5).toFixed(2), p99_ms: pct(0.99) && +pct(0.99).toFixed(2),
  max_ms: rtts.length ? +rtts[rtts.length - 1].toFixed(2) : null,
  flooder: mode === 'flood' ? flood : undefined,
}));
process.exit(0);
