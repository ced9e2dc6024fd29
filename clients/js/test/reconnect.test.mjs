// The server goes away under a connected client: killed, drained (1012), or
// closing on a frame too big (1009). The client reports the loss, rejects what
// was waiting for an answer, comes back with backoff and subscribes its rooms
// again.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { WarrenClient } from '../warren-client.js';
import { BUSES, FAST, next, rejection, startWarren, unique, within } from './warren.mjs';

for (const bus of BUSES) {
  describe(`on the ${bus} bus`, () => {
    test('killed and started again on the same port: the client comes back in its rooms', async () => {
      const first = await startWarren({ bus });
      const room = unique('r');
      const other = unique('r');
      const alice = new WarrenClient({ url: first.url, user: unique('alice'), backoff: FAST });
      let second;
      try {
        await Promise.all([alice.subscribe(room), alice.subscribe(other), alice.connect()]);
        const lost = next(alice, 'disconnected');
        await first.stop('SIGKILL');
        const d = await lost;
        assert.equal(d.opened, true);
        assert.equal(d.code, 1006);
        assert.equal(d.willRetry, true);
        assert.ok(d.delayMs >= 0 && d.delayMs < FAST.baseMs, `first retry within ${FAST.baseMs} ms: ${d.delayMs}`);
        assert.equal((await rejection(alice.send(room, 'into the void'))).code, 'not_connected');

        const back = next(alice, 'connected', (c) => c.reconnected);
        const restored = [room, other].map((r) => next(alice, 'subscribed', (s) => s.room === r && s.restored));
        second = await startWarren({ bus, port: first.port, prefix: first.prefix });
        await back;
        await Promise.all(restored);
        assert.deepEqual(alice.rooms.sort(), [room, other].sort());

        const bob = new WarrenClient({ url: second.url, user: unique('bob') });
        const heard = next(alice, 'message', (m) => m.text === 'after the restart');
        const joined = next(alice, 'presence', (p) => p.room === room && p.joins.includes(bob.user));
        await Promise.all([bob.subscribe(room), bob.connect()]);
        await bob.send(room, 'after the restart');
        assert.equal((await heard).from, bob.user);
        await joined;
        bob.close();
      } finally {
        alice.close();
        await first.stop();
        if (second) await second.stop();
      }
    });

    test('a drain closes with 1012: the client reconnects at once to the next server', async () => {
      const first = await startWarren({ bus });
      const room = unique('r');
      const carol = new WarrenClient({ url: first.url, user: unique('carol'), backoff: { baseMs: 50, capMs: 200 } });
      let second;
      try {
        await Promise.all([carol.subscribe(room), carol.connect()]);
        const lost = next(carol, 'disconnected');
        await first.stop('SIGTERM');
        const d = await lost;
        assert.equal(d.code, 1012);
        assert.equal(d.willRetry, true);
        const restored = next(carol, 'subscribed', (s) => s.room === room && s.restored);
        second = await startWarren({ bus, port: first.port, prefix: first.prefix });
        await restored;
        await within(carol.send(room, 'on the new node'), 'a send after the drain');
      } finally {
        carol.close();
        await first.stop();
        if (second) await second.stop();
      }
    });

    test('a frame over --max-frame-bytes (1009): the send rejects with connection_lost, then the client is back', async () => {
      const server = await startWarren({ bus, flags: { 'max-frame-bytes': '1024', 'max-text-bytes': '100000' } });
      const room = unique('r');
      const dave = new WarrenClient({ url: server.url, user: unique('dave'), backoff: FAST });
      try {
        await Promise.all([dave.subscribe(room), dave.connect()]);
        const lost = next(dave, 'disconnected');
        const restored = next(dave, 'subscribed', (s) => s.room === room && s.restored);
        const e = await rejection(dave.send(room, 'x'.repeat(2000)), 'the oversized send');
        assert.equal(e.code, 'connection_lost');
        assert.equal(e.closeCode, 1009);
        assert.equal((await lost).code, 1009);
        await restored;
        await within(dave.send(room, 'small enough'), 'a send after the reconnect');
      } finally {
        dave.close();
        await server.stop();
      }
    });
  });
}
