// The soak of issue 13 ("Proof"), driven by scripts/soak: Warren nodes behind
// HAProxy on the machine's RabbitMQ, chatting clients built on the JS client
// library (clients/js/warren-client.js), and chaos: client sockets cut without
// a close, and one node restarted every minute. Every client checks every
// message of every sender in its room by the sender's sequence number; at the
// end one `SOAK-FIGURES {json}` line says what was sent, delivered, lost,
// duplicated and reordered, and how the sessions came back.
//
// This file owns the run: the processes (nodes, HAProxy), the cutting proxies,
// the clients and their bookkeeping, the chaos loop, the verdict and the
// cleanup of what the run declared on the broker. scripts/soak builds the
// binary, installs what is missing and runs it with a hard bound.
//
// Layout, top to bottom: settings, processes, cutting proxies, one soak client,
// chaos, figures, the run.

import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

import { WarrenClient } from '../clients/js/warren-client.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

// ------------------------------------------------------------------ settings

function envNumber(name, fallback) {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name} must be a number >= 0, not ${raw}`);
  return n;
}

const SECS = envNumber('SOAK_SECS', 300);
const settings = {
  secs: SECS,
  clients: envNumber('SOAK_CLIENTS', 50),
  rooms: envNumber('SOAK_ROOMS', 5),
  nodes: envNumber('SOAK_NODES', 3),
  /** Messages per second per client. */
  rate: envNumber('SOAK_RATE', 1),
  /** A chaos tick cuts this many random client sockets... */
  drops: envNumber('SOAK_DROPS', 2),
  /** ...every this many seconds (randomised between half and one and a half times). */
  dropEverySecs: envNumber('SOAK_DROP_EVERY_SECS', 4),
  /** One node restarted this often; a run shorter than that restarts one at half time. */
  restartEverySecs: envNumber('SOAK_RESTART_EVERY_SECS', 60),
  /** KILL, TERM, or alternate (KILL first). */
  restartSignal: (process.env.SOAK_RESTART_SIGNAL || 'alternate').toUpperCase(),
  /** After the last send: how long receivers may take to get everything acked. */
  settleSecs: envNumber('SOAK_SETTLE_SECS', 90),
  /** Also goes into an Erlang expression when cleaning up: letters, digits, '-' and '_' only. */
  roomFanout: process.env.SOAK_ROOM_FANOUT || 'per-connection',
  prefix: process.env.SOAK_PREFIX || `soak-${crypto.randomBytes(3).toString('hex')}`,
  bin: process.env.WARREN_BIN || path.join(ROOT, 'target/debug/warren'),
  amqpUrl: process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f',
  logDir: process.env.SOAK_LOG_DIR || path.join(ROOT, 'target/soak'),
};
if (!['KILL', 'TERM', 'ALTERNATE'].includes(settings.restartSignal)) {
  throw new Error(`SOAK_RESTART_SIGNAL must be KILL, TERM or alternate, not ${settings.restartSignal}`);
}
if (!/^[A-Za-z0-9_-]+$/.test(settings.prefix)) throw new Error(`SOAK_PREFIX: letters, digits, - and _ only`);
if (settings.clients < 1 || settings.rooms < 1 || settings.nodes < 1 || settings.nodes > 9) {
  throw new Error('SOAK_CLIENTS and SOAK_ROOMS must be at least 1, SOAK_NODES 1..9');
}

const started = Date.now();
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1);
function say(line) { console.log(`[${elapsed().padStart(6)} s] ${line}`); }

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `check()` holds, polling, for at most `ms`; false if it never did. */
async function until(check, ms, everyMs = 100) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await check()) return true;
    if (Date.now() >= deadline) return false;
    await sleep(everyMs); // polling a condition, with a deadline
  }
}

// ------------------------------------------------------------------ processes

/** Every child process still running: none may outlive the run. */
const children = new Set();
process.on('exit', () => { for (const c of children) c.kill('SIGKILL'); });
for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => process.exit(130));

function track(child) {
  children.add(child);
  child.exited = new Promise((resolve) => child.once('exit', (code, sig) => {
    children.delete(child);
    resolve({ code, signal: sig });
  }));
  return child;
}

async function httpStatus(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
    await res.arrayBuffer();
    return res.status;
  } catch (_) {
    return 0;
  }
}

/** One Warren node: started on any port first, and on that same port after a restart. */
class Node {
  constructor(k, secret) {
    this.k = k;
    this.id = `${settings.prefix}-n${k}`;
    this.secret = secret;
    this.port = 0;
    this.child = null;
    this.log = path.join(settings.logDir, `${settings.prefix}.warren${k}.log`);
  }

  async start() {
    const out = fs.openSync(this.log, 'a');
    // Resume and history at their defaults (grace 30 s, 100 per room): the
    // soak measures what a deployment gets. The shared session secret lets a
    // posting token made on one node check out on another; HAProxy is on
    // loopback, so believe its X-Forwarded-For.
    const args = ['--listen', `127.0.0.1:${this.port}`, '--node-id', this.id, '--prefix', settings.prefix,
      '--static-dir', path.join(ROOT, 'static'), '--trusted-proxies', '127.0.0.1',
      '--room-fanout', settings.roomFanout];
    const env = Object.fromEntries(Object.entries(process.env)
      .filter(([k]) => !k.startsWith('WARREN_') && k !== 'AMQP_URL'));
    env.AMQP_URL = settings.amqpUrl;
    env.WARREN_SESSION_SECRET = this.secret;
    const child = track(spawn(settings.bin, args, { env, stdio: ['ignore', 'pipe', out] }));
    fs.closeSync(out);
    const first = await new Promise((resolve) => {
      const lines = readline.createInterface({ input: child.stdout });
      lines.once('line', (line) => { resolve(line); });
      child.exited.then(() => resolve(null));
    });
    child.stdout.resume(); // nothing more is read from it
    const match = first && /http:\/\/127\.0\.0\.1:(\d+)/.exec(first);
    if (!match) throw new Error(`${this.id} did not start (see ${this.log})`);
    this.port = Number(match[1]);
    this.child = child;
    const ready = await until(async () => (await httpStatus(`http://127.0.0.1:${this.port}/readyz`)) === 200, 30_000);
    if (!ready) throw new Error(`${this.id} is not ready after 30 s (see ${this.log})`);
  }

  /** Ends the process with `signal` and waits until it is gone. */
  async stop(signal) {
    const child = this.child;
    if (!child) return;
    this.child = null;
    child.kill(signal);
    // A TERM drains for --drain-secs plus jitter (10 + 5 s by default).
    const gone = await Promise.race([child.exited, sleep(40_000).then(() => null)]);
    if (!gone) { child.kill('SIGKILL'); await child.exited; }
  }
}

async function startHaproxy(nodes) {
  const port = await freePort();
  const env = { ...process.env, WARREN_HAPROXY_BIND: `127.0.0.1:${port}` };
  for (let k = 1; k <= 9; k++) delete env[`WARREN_NODE${k}`];
  for (const n of nodes) env[`WARREN_NODE${n.k}`] = `127.0.0.1:${n.port}`;
  const bin = fs.existsSync('/usr/sbin/haproxy') ? '/usr/sbin/haproxy' : 'haproxy';
  const out = fs.openSync(path.join(settings.logDir, `${settings.prefix}.haproxy.log`), 'a');
  const child = track(spawn(bin, ['-f', path.join(ROOT, 'deploy/haproxy.cfg'), '-db'],
    { env, stdio: ['ignore', out, out] }));
  fs.closeSync(out);
  const ready = await until(async () => (await httpStatus(`http://127.0.0.1:${port}/readyz`)) === 200, 30_000);
  if (!ready) throw new Error('HAProxy does not answer (see its log in target/soak)');
  return { port, child };
}

/** The sessions `node` has open (its `warren_connections` gauges), 0 if it is down. */
async function sessionsOpen(node) {
  if (!node.child) return 0;
  try {
    const res = await fetch(`http://127.0.0.1:${node.port}/metrics`, { signal: AbortSignal.timeout(2000) });
    const text = await res.text();
    let open = 0;
    for (const m of text.matchAll(/^warren_connections\{[^}]*\} (\d+)/gm)) open += Number(m[1]);
    return open;
  } catch (_) {
    return 0;
  }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

// ------------------------------------------------------------------ cutting proxies

/**
 * A TCP proxy in front of HAProxy for one client: `cut()` destroys its
 * connection at once, both sides, with no close frame, as a lost network does.
 * The client's next connection goes through again.
 */
class Cutter {
  constructor(upstreamPort) {
    this.upstreamPort = upstreamPort;
    this.sockets = new Set();
    this.server = net.createServer((inbound) => this.#join(inbound));
  }

  async listen() {
    await new Promise((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    return `http://127.0.0.1:${this.server.address().port}`;
  }

  #join(inbound) {
    const outbound = net.connect(this.upstreamPort, '127.0.0.1');
    const both = [inbound, outbound];
    for (const s of both) { this.sockets.add(s); s.setNoDelay(true); }
    const end = () => { for (const s of both) { s.destroy(); this.sockets.delete(s); } };
    inbound.pipe(outbound);
    outbound.pipe(inbound);
    for (const s of both) s.on('error', end).on('close', end);
  }

  /** Cuts whatever passes through now; false if nothing did. */
  cut() {
    if (this.sockets.size === 0) return false;
    // resetAndDestroy sends an RST where it can: nothing is flushed, as in a real drop.
    for (const s of this.sockets) (s.resetAndDestroy ? s.resetAndDestroy() : s.destroy());
    this.sockets.clear();
    return true;
  }

  close() { this.cut(); this.server.close(); }
}

// ------------------------------------------------------------------ one soak client

/**
 * One chatting client: a WarrenClient through its own Cutter, sending
 * `soak <user> <seq>` to its room every 1/rate s while connected, and keeping,
 * for every sender of its room, which sequence numbers it got and in which order.
 */
class SoakClient {
  constructor(i, room, url) {
    this.user = `u${String(i).padStart(3, '0')}`;
    this.room = room;
    this.client = new WarrenClient({ url, user: this.user });
    // Sending.
    this.nextSeq = 0;
    /** seq -> ms since the start when acked. */
    this.acked = new Map();
    this.unconfirmed = new Set();
    this.refused = {};
    this.skipped = 0;
    this.inFlight = new Set();
    // Receiving: sender -> { seen: Set<seq>, max }.
    this.from = new Map();
    this.received = 0;
    this.duplicates = [];
    this.reorders = [];
    this.fromHistory = 0;
    this.foreign = 0;
    // Sessions.
    this.resumedRecovered = 0;
    this.resumedNotRecovered = 0;
    this.freshSessions = 0;
    this.disconnects = 0;
    this.lostAt = null;
    /** ms from a lost connection to the next welcome, each. */
    this.outages = [];
    /** [lost at, back at] of every session that came back not recovered (or not resumed). */
    this.breaks = [];
    this.sessions = new Set();
    this.nodes = new Set();

    const c = this.client;
    c.on('message', (m) => this.#onMessage(m));
    c.on('disconnected', () => {
      this.disconnects++;
      if (this.lostAt === null) this.lostAt = Date.now();
    });
    c.on('connected', (w) => {
      this.nodes.add(w.node);
      if (w.reconnected && this.lostAt !== null) this.outages.push(Date.now() - this.lostAt);
      if (w.reconnected && !this.sessions.has(w.session)) {
        this.freshSessions++;
        this.breaks.push([this.lostAt, Date.now()]);
      }
      this.sessions.add(w.session);
      this.lostAt = null;
    });
    c.on('resumed', (r) => {
      if (r.recovered) this.resumedRecovered++;
      else this.resumedNotRecovered++;
    });
  }

  #onMessage(m) {
    if (m.room !== this.room) return;
    const match = /^soak (\S+) (\d+)$/.exec(m.text || '');
    if (!match || match[1] !== m.from) { this.foreign++; return; }
    const [, sender, seqText] = match;
    const seq = Number(seqText);
    if (m.history) this.fromHistory++;
    let s = this.from.get(sender);
    if (!s) { s = { seen: new Set(), max: 0 }; this.from.set(sender, s); }
    if (s.seen.has(seq)) {
      this.duplicates.push({ sender, seq, history: !!m.history, at: elapsed() });
      return;
    }
    s.seen.add(seq);
    this.received++;
    if (seq < s.max) this.reorders.push({ sender, seq, after: s.max, history: !!m.history, at: elapsed() });
    else s.max = seq;
  }

  /** One tick of the sender: a numbered message if connected, else nothing. */
  tick() {
    if (this.client.state !== 'connected') { this.skipped++; return; }
    const seq = ++this.nextSeq;
    const sending = this.client.send(this.room, `soak ${this.user} ${seq}`)
      .then(() => { this.acked.set(seq, Date.now()); })
      .catch((e) => {
        if (e.code === 'connection_lost') this.unconfirmed.add(seq);
        else this.refused[e.code] = (this.refused[e.code] || 0) + 1;
      })
      .finally(() => this.inFlight.delete(sending));
    this.inFlight.add(sending);
  }

  /** Has this client got every message acked to `sender`? */
  hasAll(sender) {
    const seen = this.from.get(sender.user)?.seen;
    for (const seq of sender.acked.keys()) if (!seen || !seen.has(seq)) return false;
    return true;
  }
}

// ------------------------------------------------------------------ chaos

function shuffle(list) {
  const a = [...list];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

/** Cuts random clients' sockets every few seconds until `stop.now`. */
async function cutSockets(clients, cutters, stop, counts) {
  while (!stop.now) {
    const waitMs = settings.dropEverySecs * 1000 * (0.5 + Math.random());
    await sleep(waitMs);
    if (stop.now) return;
    let cut = 0;
    for (const i of shuffle(clients.keys())) {
      if (cut >= settings.drops) break;
      if (clients[i].client.state === 'connected' && cutters[i].cut()) cut++;
    }
    counts.socketsCut += cut;
  }
}

/** Restarts one node at a time, every restartEverySecs (or once, at half time). */
async function restartNodes(nodes, stop, counts, from) {
  const every = Math.min(settings.restartEverySecs, settings.secs / 2) * 1000;
  if (every <= 0) return;
  let k = 0;
  for (;;) {
    const at = from + every * (counts.restarts.length + 1);
    // Not as the sending stops: a restart then would test only the clean-up.
    if (at > from + settings.secs * 1000 - 1000) return;
    while (!stop.now && Date.now() < at) await sleep(Math.min(500, at - Date.now()));
    if (stop.now) return;
    const node = nodes[k % nodes.length];
    k++;
    const signal = settings.restartSignal === 'ALTERNATE'
      ? (counts.restarts.length % 2 === 0 ? 'SIGKILL' : 'SIGTERM')
      : `SIG${settings.restartSignal}`;
    const t0 = Date.now();
    say(`restarting ${node.id} (${signal})`);
    await node.stop(signal);
    const stopped = Date.now();
    await node.start();
    counts.restarts.push({ node: node.id, signal, at_s: Number(((t0 - started) / 1000).toFixed(1)),
      stop_s: Number(((stopped - t0) / 1000).toFixed(1)), start_s: Number(((Date.now() - stopped) / 1000).toFixed(1)) });
    say(`${node.id} is back (stopped in ${((stopped - t0) / 1000).toFixed(1)} s, ready ${((Date.now() - stopped) / 1000).toFixed(1)} s later)`);
  }
}

// ------------------------------------------------------------------ figures

function percentile(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}

/**
 * What every receiver got of what every sender of its room had acked. A lost
 * message is one acked to its sender that a member of the room (every client
 * stays subscribed for the whole run) never got; it is "after a break" when the
 * receiver's session came back not recovered around the time it was acked, so
 * only the room's history could have brought it.
 */
function tally(clients, counts) {
  const byRoom = new Map();
  for (const c of clients) {
    if (!byRoom.has(c.room)) byRoom.set(c.room, []);
    byRoom.get(c.room).push(c);
  }
  let expected = 0;
  let delivered = 0;
  const lost = [];
  let unconfirmedDelivered = 0;
  for (const members of byRoom.values()) {
    for (const receiver of members) {
      for (const sender of members) {
        const seen = receiver.from.get(sender.user)?.seen || new Set();
        for (const [seq, ackedAt] of sender.acked) {
          expected++;
          if (seen.has(seq)) { delivered++; continue; }
          const afterBreak = receiver.breaks.some(([lostAt, backAt]) =>
            ackedAt >= (lostAt ?? backAt) - 5000 && ackedAt <= backAt + 5000);
          lost.push({ receiver: receiver.user, sender: sender.user, seq, acked_s: ((ackedAt - started) / 1000).toFixed(1), afterBreak });
        }
        for (const seq of sender.unconfirmed) if (seen.has(seq)) unconfirmedDelivered++;
      }
    }
  }
  const sum = (f) => clients.reduce((n, c) => n + f(c), 0);
  const outages = clients.flatMap((c) => c.outages).sort((a, b) => a - b);
  const refused = {};
  for (const c of clients) for (const [code, n] of Object.entries(c.refused)) refused[code] = (refused[code] || 0) + n;
  const duplicates = clients.flatMap((c) => c.duplicates.map((d) => ({ receiver: c.user, ...d })));
  const reorders = clients.flatMap((c) => c.reorders.map((r) => ({ receiver: c.user, ...r })));
  return {
    secs: settings.secs,
    clients: settings.clients,
    rooms: settings.rooms,
    nodes: settings.nodes,
    rate: settings.rate,
    prefix: settings.prefix,
    sent: sum((c) => c.nextSeq),
    acked: sum((c) => c.acked.size),
    unconfirmed: sum((c) => c.unconfirmed.size),
    unconfirmed_delivered: unconfirmedDelivered,
    refused,
    skipped_ticks: sum((c) => c.skipped),
    expected,
    delivered,
    from_history: sum((c) => c.fromHistory),
    lost: lost.length,
    lost_after_break: lost.filter((l) => l.afterBreak).length,
    duplicated: duplicates.length,
    reordered: reorders.length,
    sockets_cut: counts.socketsCut,
    restarts: counts.restarts,
    disconnects: sum((c) => c.disconnects),
    resumed_recovered: sum((c) => c.resumedRecovered),
    resumed_not_recovered: sum((c) => c.resumedNotRecovered),
    fresh_sessions: sum((c) => c.freshSessions),
    outage_ms: { p50: percentile(outages, 0.5), p99: percentile(outages, 0.99), max: outages.at(-1) ?? null },
    settle_s: counts.settleSecs,
    samples: { lost: lost.slice(0, 20), duplicated: duplicates.slice(0, 20), reordered: reorders.slice(0, 20) },
  };
}

// ------------------------------------------------------------------ the run

/**
 * Removes what the run declared on the broker: its queues (the durable history
 * stream among them) and its exchanges. Room exchanges go by themselves with
 * their last binding; `<prefix>.direct` is not auto-deleted, and rabbitmqctl
 * has no command to delete an exchange, so it asks the broker's own function.
 */
function cleanBroker() {
  const ctl = (args) => spawnSync('rabbitmqctl', ['-q', ...args], { encoding: 'utf8' });
  const ours = (out) => out.split('\n').map((l) => l.trim()).filter((n) => n.startsWith(`${settings.prefix}.`));
  const list = ctl(['list_queues', 'name']);
  if (list.status !== 0) { say(`rabbitmqctl list_queues failed: ${list.stderr.trim()}`); return null; }
  const queues = ours(list.stdout);
  for (const name of queues) ctl(['delete_queue', name]);
  const vhost = decodeURIComponent(new URL(settings.amqpUrl.split(',')[0]).pathname.slice(1) || '%2f');
  const exchanges = ours(ctl(['list_exchanges', 'name']).stdout);
  for (const name of exchanges) {
    ctl(['eval', `rabbit_exchange:delete(rabbit_misc:r(<<"${vhost}">>, exchange, <<"${name}">>), false, <<"soak">>).`]);
  }
  return {
    queues_deleted: queues.length,
    queues_kinds: [...new Set(queues.map((q) => q.slice(settings.prefix.length + 1).split('.')[0]))],
    exchanges_deleted: exchanges.length,
    left: ours(ctl(['list_queues', 'name']).stdout).concat(ours(ctl(['list_exchanges', 'name']).stdout)),
  };
}

async function main() {
  fs.mkdirSync(settings.logDir, { recursive: true });
  say(`soak ${settings.prefix}: ${settings.clients} clients in ${settings.rooms} rooms, ${settings.nodes} nodes, ` +
    `${settings.secs} s; logs in ${path.relative(ROOT, settings.logDir)}/${settings.prefix}.*`);
  const secret = crypto.randomBytes(16).toString('hex');
  const nodes = Array.from({ length: settings.nodes }, (_, i) => new Node(i + 1, secret));
  const cutters = [];
  const clients = [];
  let haproxy = null;
  const stop = { now: false };
  const counts = { socketsCut: 0, restarts: [], settleSecs: null };
  let figures = null;
  try {
    for (const n of nodes) await n.start();
    haproxy = await startHaproxy(nodes);
    say(`nodes on ports ${nodes.map((n) => n.port).join(', ')}; HAProxy on ${haproxy.port}`);

    for (let i = 0; i < settings.clients; i++) {
      const cutter = new Cutter(haproxy.port);
      cutters.push(cutter);
      clients.push(new SoakClient(i, `room${i % settings.rooms}`, await cutter.listen()));
    }
    await Promise.all(clients.map((c) => Promise.all([c.client.subscribe(c.room), c.client.connect()])));
    // Every member is in its room before anyone sends: the count of what each
    // should get starts at the first message.
    say(`all ${clients.length} clients subscribed; sending for ${settings.secs} s`);

    const sendStart = Date.now();
    const periodMs = 1000 / settings.rate;
    const timers = clients.map((c) => {
      let timer = null;
      const first = setTimeout(() => { c.tick(); timer = setInterval(() => c.tick(), periodMs); }, Math.random() * periodMs);
      return () => { clearTimeout(first); clearInterval(timer); };
    });
    const chaos = [cutSockets(clients, cutters, stop, counts), restartNodes(nodes, stop, counts, sendStart)];
    const progress = setInterval(() => {
      const acked = clients.reduce((n, c) => n + c.acked.size, 0);
      const got = clients.reduce((n, c) => n + c.received, 0);
      say(`acked ${acked}, received ${got}, sockets cut ${counts.socketsCut}, restarts ${counts.restarts.length}`);
    }, 30_000);

    await sleep(sendStart + settings.secs * 1000 - Date.now());
    for (const stopTimer of timers) stopTimer();
    stop.now = true;
    clearInterval(progress);
    say('sending stopped; waiting for the chaos loop to finish a restart in progress');
    await Promise.all(chaos);
    await Promise.all(clients.flatMap((c) => [...c.inFlight]));

    // Every receiver gets what was acked, unless something is lost: wait for
    // it (resumes and history take their time), then count.
    const settleStart = Date.now();
    const settled = await until(() => clients.every((r) => clients.every((s) => s.room !== r.room || r.hasAll(s))),
      settings.settleSecs * 1000, 250);
    counts.settleSecs = Number(((Date.now() - settleStart) / 1000).toFixed(1));
    say(settled ? `every receiver has everything acked (${counts.settleSecs} s after the last send)`
      : `not everything acked arrived within ${settings.settleSecs} s`);
    figures = tally(clients, counts);
  } finally {
    stop.now = true;
    // A client that closes with a close frame ends its session, which
    // deletes its queue: let the frames through the proxies and the nodes
    // finish, then cut what is left and SIGINT each node (no drain).
    for (const c of clients) c.client.close();
    const idle = await until(async () => {
      const open = await Promise.all(nodes.map((n) => sessionsOpen(n)));
      return open.every((k) => k === 0);
    }, 15_000, 250);
    if (!idle) say('the nodes still had sessions 15 s after the clients closed');
    for (const cutter of cutters) cutter.close();
    if (haproxy) { haproxy.child.kill('SIGTERM'); await haproxy.child.exited; }
    await Promise.all(nodes.map((n) => n.stop('SIGINT')));
    const cleaned = cleanBroker();
    if (figures) figures.cleanup = cleaned;
  }

  const pass = figures.lost === 0 && figures.duplicated === 0 && figures.reordered === 0;
  figures.pass = pass;
  console.log(`sent ${figures.sent} (acked ${figures.acked}, unconfirmed ${figures.unconfirmed}, refused ${JSON.stringify(figures.refused)}); ` +
    `delivered ${figures.delivered} of ${figures.expected}; lost ${figures.lost} (${figures.lost_after_break} after a session not recovered), ` +
    `duplicated ${figures.duplicated}, reordered ${figures.reordered}`);
  console.log(`sockets cut ${figures.sockets_cut}, node restarts ${figures.restarts.length}, disconnects ${figures.disconnects}; ` +
    `resumed recovered ${figures.resumed_recovered}, not recovered ${figures.resumed_not_recovered}, fresh sessions ${figures.fresh_sessions}; ` +
    `back after p50 ${figures.outage_ms.p50} ms, p99 ${figures.outage_ms.p99} ms, max ${figures.outage_ms.max} ms`);
  console.log(`SOAK-FIGURES ${JSON.stringify(figures)}`);
  process.exitCode = pass ? 0 : 1;
}

main().catch((e) => {
  console.error(`soak: ${e.stack || e}`);
  process.exitCode = 2;
});
