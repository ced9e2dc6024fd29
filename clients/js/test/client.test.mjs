// The client against one real Warren per bus: sending with acks, direct
// messages, refusals carrying their code, presence as a member set, leaving.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { backoffDelay } from '../warren-client.js';
import { BUSES, next, rejection, serverForSuite, unique, within } from './warren.mjs';

test('backoffDelay: full jitter under an exponential ceiling with a cap', () => {
  assert.equal(backoffDelay(0, 500, 15000, () => 0), 0);
  assert.equal(backoffDelay(0, 500, 15000, () => 0.999), 499);
  assert.equal(backoffDelay(3, 500, 15000, () => 0.5), 2000); // ceiling 4000
  assert.equal(backoffDelay(10, 500, 15000, () => 0.5), 7500); // capped at 15000
});

for (const bus of BUSES) {
  describe(`on the ${bus} bus`, () => {
    const suite = serverForSuite({ bus });
    const client = (options) => suite.client(options);

    test('a send resolves with the id its echo carries; a direct message reaches every party', async () => {
      const room = unique('r');
      const alice = client({ user: unique('alice') });
      const bob = client({ user: unique('bob') });
      await Promise.all([alice.subscribe(room), bob.subscribe(room), alice.connect(), bob.connect()]);
      assert.equal(alice.state, 'connected');
      assert.deepEqual(alice.rooms, [room]);

      const echo = next(alice, 'message', (m) => m.text === 'hello');
      const seen = next(bob, 'message', (m) => m.text === 'hello');
      const { id } = await within(alice.send(room, 'hello'), 'the ack');
      assert.equal((await echo).id, id);
      const got = await seen;
      assert.equal(got.from, alice.user);
      assert.equal(got.room, room);

      const dm = next(bob, 'direct', (m) => m.text === 'psst');
      const sent = await within(alice.sendDirect(bob.user, 'psst'), 'the direct ack');
      const d = await dm;
      assert.equal(d.id, sent.id);
      assert.equal(d.from, alice.user);
      assert.equal(d.to, bob.user);
    });

    test('refusals reject with their code and leave the connection usable', async () => {
      const room = unique('r');
      const carol = client({ user: unique('carol') });
      await Promise.all([carol.subscribe(room), carol.connect()]);
      const offline = await rejection(carol.sendDirect(unique('nobody'), 'anyone?'), 'a DM to nobody');
      assert.equal(offline.code, 'user_not_found');
      assert.match(offline.ref, /^m/);
      const blank = await rejection(carol.send(room, '   '), 'a blank message');
      assert.equal(blank.code, 'invalid_message');
      const elsewhere = await rejection(carol.send(unique('not-mine'), 'hi'), 'a message to a room not subscribed');
      assert.equal(elsewhere.code, 'not_subscribed');
      await within(carol.send(room, 'still fine'), 'a good message after the refusals');
      const bad = await rejection(carol.subscribe('no spaces'), 'a bad room name');
      assert.equal(bad.code, 'invalid_room');
    });

    test('presence: each room keeps a live member set, joins and leaves as events', async () => {
      const room = unique('r');
      const dave = client({ user: unique('dave') });
      await Promise.all([dave.subscribe(room), dave.connect()]);
      assert.deepEqual([...dave.members(room)], [dave.user]);

      const erin = client({ user: unique('erin') });
      const joined = next(dave, 'presence', (p) => p.room === room && p.joins.includes(erin.user));
      const subscribed = erin.subscribe(room);
      await erin.connect();
      const { members } = await subscribed;
      assert.ok(members.has(dave.user) && members.has(erin.user), `erin sees ${[...members]}`);
      const p = await joined;
      assert.deepEqual(p.leaves, []);
      assert.ok(p.members.has(erin.user));
      assert.ok(dave.members(room).has(erin.user));

      const left = next(dave, 'presence', (q) => q.room === room && q.leaves.includes(erin.user));
      erin.close();
      await left;
      assert.deepEqual([...dave.members(room)], [dave.user]);
    });

    test('after unsubscribe no message of the room arrives, and it is not restored', async () => {
      const room = unique('r');
      const other = unique('r');
      const frank = client({ user: unique('frank') });
      await Promise.all([frank.subscribe(room), frank.subscribe(other), frank.connect()]);
      await within(frank.unsubscribe(room), 'the unsubscribe');
      assert.deepEqual(frank.rooms, [other]);
      const late = [];
      frank.on('message', (m) => { if (m.room === room) late.push(m); });
      const gina = client({ user: unique('gina') });
      await Promise.all([gina.subscribe(room), gina.subscribe(other), gina.connect()]);
      await gina.send(room, 'not for frank');
      // Per-sender order: once frank has this one, the earlier one would have come.
      const marker = next(frank, 'message', (m) => m.text === 'marker');
      await gina.send(other, 'marker');
      await marker;
      assert.deepEqual(late, []);
    });

    test('a send while not connected rejects at once with not_connected', async () => {
      const idle = client({ user: unique('idle') });
      const e = await rejection(idle.send('lobby', 'hello?'), 'a send before connect');
      assert.equal(e.code, 'not_connected');
    });
  });
}
