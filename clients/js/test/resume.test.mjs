// Nothing lost across a dropped connection: the client acknowledges what its
// listeners processed, and when its connection drops (a TCP proxy between it
// and the server cuts it, no close frame) it resumes its session; the
// messages sent meanwhile arrive once each, in order. And a room's history on
// subscribe, before live messages.

import assert from 'node:assert/strict';
import net from 'node:net';
import { describe, test } from 'node:test';

import { WarrenClient } from '../warren-client.js';
import { BUSES, FAST, next, startWarren, unique, within } from './warren.mjs';

/**
 * A TCP proxy to `port` on 127.0.0.1 that can cut every connection through
 * it at once and hold new ones off until let through again.
 */
async function proxy(port) {
  const pairs = new Set();
  let open = true;
  const server = net.createServer((client) => {
    if (!open) { client.destroy(); return; }
    const upstream = net.connect(port, '127.0.0.1');
    const pair = [client, upstream];
    pairs.add(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => { pairs.delete(pair); client.destroy(); upstream.destroy(); };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    /** Cuts every connection, and refuses new ones until `letThrough()`. */
    cut() {
      open = false;
      for (const [client, upstream] of pairs) { client.destroy(); upstream.destroy(); }
      pairs.clear();
    },
    letThrough() { open = true; },
    close() { this.cut(); server.close(); },
  };
}

/** Every `message` text `client` gets in `room`, in order. */
function collect(client, room) {
  const texts = [];
  client.on('message', (m) => { if (m.room === room) texts.push(m.text); });
  return texts;
}

async function until(check, what) {
  await within((async () => {
    while (!check()) await new Promise((r) => setTimeout(r, 10));
  })(), what);
}

/**
 * Alice (connected through `cutter`) and bob in `room`: bob sends n0…n19,
 * alice gets them, her connection is cut, bob sends n20…n49 while she is
 * away, and she is let back. What alice has seen (growing), her session
 * before the cut, and her `resumed` event.
 */
async function cutMidStream(alice, bob, cutter, room) {
  const seen = collect(alice, room);
  await Promise.all([alice.subscribe(room), alice.connect(), bob.subscribe(room), bob.connect()]);
  for (let i = 0; i < 20; i++) await bob.send(room, `n${i}`);
  await until(() => seen.length === 20, 'the first 20');
  const session = alice.session;
  const lost = next(alice, 'disconnected');
  cutter.cut();
  await lost;
  for (let i = 20; i < 50; i++) await bob.send(room, `n${i}`);
  const resumed = next(alice, 'resumed');
  cutter.letThrough();
  return { seen, session, resumed: await resumed };
}

for (const bus of BUSES) {
  describe(`on the ${bus} bus`, () => {
    test('a dropped connection resumes, and what was sent meanwhile arrives once, in order', async () => {
      const server = await startWarren({ bus });
      const cutter = await proxy(server.port);
      const room = unique('r');
      const alice = new WarrenClient({ url: cutter.url, user: unique('alice'), backoff: FAST });
      const bob = new WarrenClient({ url: server.url, user: unique('bob') });
      try {
        const { seen, session, resumed: r } = await cutMidStream(alice, bob, cutter, room);
        assert.equal(r.recovered, true);
        assert.equal(alice.session, session, 'the same session');
        assert.deepEqual(r.rooms, [room]);
        await bob.send(room, 'live');
        await until(() => seen.at(-1) === 'live', 'the live message');
        const expected = Array.from({ length: 50 }, (_, i) => `n${i}`).concat('live');
        assert.deepEqual(seen, expected);
      } finally {
        alice.close();
        bob.close();
        cutter.close();
        await server.stop();
      }
    });

    test('subscribe with history: the last messages first, then live ones', async () => {
      const server = await startWarren({ bus, flags: { 'history-per-room': '100' } });
      const room = unique('r');
      const bob = new WarrenClient({ url: server.url, user: unique('bob') });
      const carol = new WarrenClient({ url: server.url, user: unique('carol') });
      try {
        await Promise.all([bob.subscribe(room), bob.connect()]);
        for (let i = 0; i < 30; i++) await bob.send(room, `n${i}`);
        const seen = [];
        carol.on('message', (m) => { if (m.room === room) seen.push([m.text, !!m.history]); });
        const page = next(carol, 'history', (h) => h.room === room);
        await Promise.all([carol.subscribe(room, { history: 10 }), carol.connect()]);
        assert.equal((await page).complete, true);
        await bob.send(room, 'live');
        await until(() => seen.length === 11, 'ten from history and one live');
        const expected = Array.from({ length: 10 }, (_, i) => [`n${20 + i}`, true]).concat([['live', false]]);
        assert.deepEqual(seen, expected);
      } finally {
        bob.close();
        carol.close();
        await server.stop();
        if (bus === 'amqp') await server.deleteHistory();
      }
    });
  });
}

describe('with per-node fanout (the queue keeps no room messages)', () => {
  test('a resume catches up from history: everything once, in order, then live', async () => {
    const server = await startWarren({
      bus: 'amqp',
      flags: { 'room-fanout': 'per-node', 'history-per-room': '100' },
    });
    const cutter = await proxy(server.port);
    const room = unique('r');
    const alice = new WarrenClient({ url: cutter.url, user: unique('alice'), backoff: FAST });
    const bob = new WarrenClient({ url: server.url, user: unique('bob') });
    try {
      const { seen, resumed: r } = await cutMidStream(alice, bob, cutter, room);
      // Live traffic while the history page may still be on its way.
      for (let i = 50; i < 60; i++) await bob.send(room, `n${i}`);
      assert.equal(r.recovered, false, 'rooms come from history in this mode');
      await until(() => seen.at(-1) === 'n59', 'the live messages');
      const expected = Array.from({ length: 60 }, (_, i) => `n${i}`);
      assert.deepEqual(seen, expected);
    } finally {
      alice.close();
      bob.close();
      cutter.close();
      await server.stop();
      await server.deleteHistory();
    }
  });
});

describe('receipts', () => {
  test('a direct message sent with a receipt earns a delivered event once acknowledged', async () => {
    const server = await startWarren({ bus: 'memory' });
    const alice = new WarrenClient({ url: server.url, user: unique('alice') });
    const bob = new WarrenClient({ url: server.url, user: unique('bob'), ackDelayMs: 10 });
    try {
      await Promise.all([alice.connect(), bob.connect()]);
      const delivered = next(alice, 'delivered');
      const { id } = await alice.sendDirect(bob.user, 'did you get this?', { receipt: true });
      assert.deepEqual(await delivered, { id, to: bob.user });
    } finally {
      alice.close();
      bob.close();
      await server.stop();
    }
  });
});
