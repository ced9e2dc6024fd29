// The test harness: real Warren processes on port 0, HS256 tokens, and waiting
// for a client's events with a deadline.
//
// The binary is $WARREN_BIN (tests/client_js.rs sets it to the one cargo
// built), else target/debug/warren. RabbitMQ is $AMQP_URL, else the local
// broker; every server gets its own name prefix, every test its own rooms.

import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import path from 'node:path';
import readline from 'node:readline';
import { after, before } from 'node:test';
import { fileURLToPath } from 'node:url';

import { WarrenClient } from '../warren-client.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const BIN = process.env.WARREN_BIN || path.join(ROOT, 'target/debug/warren');
const AMQP_URL = process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f';

/** Every server started and not yet gone: none may outlive the test process. */
const live = new Set();
/**
 * Prefixes used on the shared broker. A server deletes its direct and presence
 * exchanges when it shuts down as the last node of its prefix, but the tests
 * kill theirs: on exit, one `rabbitmqctl eval` deletes them all.
 */
const onBroker = new Set();
process.on('exit', () => {
  for (const child of live) child.kill('SIGKILL');
  if (onBroker.size === 0) return;
  const names = [...onBroker].flatMap((p) => [`<<"${p}.direct">>`, `<<"${p}.presence">>`]).join(',');
  const ctl = spawnSync('rabbitmqctl', ['-q', 'eval',
    `[rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, N), false, <<"tests">>) || N <- [${names}]], ok.`],
  { stdio: 'ignore', timeout: 30_000 });
  if (ctl.status !== 0) console.error('rabbitmqctl eval failed: the tests\' exchanges stay on the broker');
});
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => process.exit(1)); // runs the 'exit' handler above
}

/** How long any awaited event may take before the test fails. */
export const WAIT_MS = 10_000;

/** Both buses: every server test runs on each. */
export const BUSES = ['memory', 'amqp'];

/** Fast reconnects for tests: the first retry within 50 ms, none later than 400 ms. */
export const FAST = { baseMs: 50, capMs: 400 };

/** A name no other test (or earlier run on the shared broker) uses. */
export function unique(stem) {
  return `${stem}-${crypto.randomBytes(4).toString('hex')}`;
}

/**
 * Starts `warren` on 127.0.0.1:`port` (0: any free port) and waits until
 * /readyz says it serves. `flags` are `--name value` pairs (true: a bare flag),
 * on top of test defaults that lift the per-client limits.
 */
export async function startWarren({ bus = 'memory', port = 0, prefix = unique('jst'), flags = {} } = {}) {
  const all = {
    'presence-batch-ms': '10',
    'publish-rate': '1000000',
    'publish-burst': '1000000',
    'max-connections-per-ip': '1000000',
    'connections-per-ip-per-sec': '1000000',
    'drain-secs': '0',
    'drain-jitter-secs': '0',
    // No durable history stream left on the shared broker.
    'history-per-room': '0',
    ...flags,
  };
  const args = ['--listen', `127.0.0.1:${port}`, '--static-dir', path.join(ROOT, 'static'), '--prefix', prefix];
  for (const [name, value] of Object.entries(all)) {
    if (value === true) args.push(`--${name}`);
    else args.push(`--${name}`, String(value));
  }
  // Only what the test says configures the server, not the caller's environment.
  const env = Object.fromEntries(Object.entries(process.env)
    .filter(([k]) => !k.startsWith('WARREN_') && k !== 'AMQP_URL'));
  if (bus === 'amqp') {
    env.AMQP_URL = AMQP_URL;
    // Quoted into an Erlang binary at exit: nothing that needs escaping.
    if (!/^[A-Za-z0-9._-]+$/.test(prefix)) throw new Error(`prefix ${prefix}`);
    onBroker.add(prefix);
  }
  const child = spawn(BIN, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => { log.push(chunk); if (log.length > 50) log.shift(); });
  live.add(child);
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => {
    live.delete(child);
    resolve({ code, signal });
  }));

  const lines = readline.createInterface({ input: child.stdout });
  const first = await within(new Promise((resolve, reject) => {
    lines.once('line', resolve);
    child.once('error', reject);
    exited.then(({ code }) => reject(new Error(`warren exited (${code}) before listening: ${log.join('')}`)));
  }), `warren to print its address (${BIN})`);
  lines.close();
  const match = /http:\/\/(\S+)$/.exec(first.trim());
  if (!match) throw new Error(`unexpected first line from warren: ${first}`);
  const url = `http://${match[1]}`;
  await within((async () => {
    for (;;) {
      const res = await fetch(`${url}/readyz`).catch(() => null);
      if (res && res.status === 200) return;
      await new Promise((r) => setTimeout(r, 20)); // polling a condition, with a deadline
    }
  })(), `${url}/readyz to answer 200`);

  return {
    url,
    port: Number(new URL(url).port),
    prefix,
    /** Deletes the server's history stream from the shared broker. */
    async deleteHistory() {
      const ctl = spawn('rabbitmqctl', ['-q', 'delete_queue', `${prefix}.history`], { stdio: 'ignore' });
      await within(new Promise((resolve) => ctl.on('exit', resolve).on('error', resolve)), 'rabbitmqctl delete_queue');
    },
    /** Ends the process with `signal` and waits until it is gone. */
    async stop(signal = 'SIGKILL') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return within(exited, `warren to exit on ${signal}`);
    },
  };
}

/**
 * One server for the enclosing `describe` (started before its tests, stopped
 * after them), and `client(options)`: a WarrenClient for it, with fast
 * reconnects, closed with it.
 */
export function serverForSuite({ bus, flags } = {}) {
  const suite = {
    server: null,
    clients: [],
    client(options) {
      const c = new WarrenClient({ url: suite.server.url, backoff: FAST, ...options });
      suite.clients.push(c);
      return c;
    },
  };
  before(async () => { suite.server = await startWarren({ bus, flags }); });
  after(async () => {
    for (const c of suite.clients) c.close();
    await suite.server.stop();
  });
  return suite;
}

/** An HS256 JWT, as the application's auth would sign it. */
export function mintToken(secret, claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  const mac = crypto.createHmac('sha256', secret).update(body).digest('base64url');
  return `${body}.${mac}`;
}

/** Unix seconds, `secs` from now. */
export function inSeconds(secs) {
  return Math.floor(Date.now() / 1000) + secs;
}

/** `promise`, or a failure naming `what` after `ms`. */
export function within(promise, what, ms = WAIT_MS) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/**
 * The next `name` event of `client` whose detail passes `accept`. Call it
 * before the action that causes the event.
 */
export function next(client, name, accept = () => true, ms = WAIT_MS) {
  let stop;
  const seen = new Promise((resolve) => {
    stop = client.on(name, (detail) => {
      if (!accept(detail)) return;
      stop();
      resolve(detail);
    });
  });
  return within(seen, `the ${name} event`, ms).finally(() => stop());
}

/** The error `promise` rejects with (failing if it resolves). */
export async function rejection(promise, what = 'the promise') {
  try {
    const value = await within(promise, what);
    throw new Error(`${what} resolved with ${JSON.stringify(value)}, expected a rejection`);
  } catch (e) {
    if (e && e.name === 'WarrenError') return e;
    throw e;
  }
}
