// The client on a Warren that takes identity from tokens (--jwt-secret):
// refusals with their codes (forbidden, rate_limited with retryAfterMs,
// token_required), and a token refreshed through getToken before it runs out.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { BUSES, inSeconds, mintToken, next, rejection, serverForSuite, unique, within } from './warren.mjs';

const SECRET = 'client-js-test-secret';

for (const bus of BUSES) {
  describe(`on the ${bus} bus`, () => {
    const suite = serverForSuite({ bus, flags: { 'jwt-secret': SECRET, 'publish-rate': '1', 'publish-burst': '2' } });
    const client = (options) => suite.client(options);

    test('outside the token\'s rooms, subscribe and send reject with forbidden', async () => {
      const team = unique('team');
      const news = unique('news');
      const token = mintToken(SECRET, { sub: unique('alice'), exp: inSeconds(600), rooms: ['team-*'], rooms_read: [news] });
      const alice = client({ token });
      const dropped = next(alice, 'subscribeError', (s) => s.room === 'secret');
      const refused = rejection(alice.subscribe('secret'), 'the subscribe to a room not in the token');
      await Promise.all([alice.subscribe(team), alice.subscribe(news), alice.connect()]);
      assert.equal((await refused).code, 'forbidden');
      assert.equal((await dropped).error.code, 'forbidden');
      assert.deepEqual(alice.rooms.sort(), [news, team].sort());

      const readOnly = await rejection(alice.send(news, 'may I?'), 'a send to a read-only room');
      assert.equal(readOnly.code, 'forbidden');
      await within(alice.send(team, 'yes here'), 'a send to a room the token allows');
    });

    test('over the publish rate, a send rejects with rate_limited and says when to retry', async () => {
      const room = unique('team');
      const bob = client({ token: mintToken(SECRET, { sub: unique('bob'), exp: inSeconds(600) }) });
      await Promise.all([bob.subscribe(room), bob.connect()]);
      const results = await Promise.allSettled([1, 2, 3, 4].map((n) => bob.send(room, `burst ${n}`)));
      const limited = results.filter((r) => r.status === 'rejected').map((r) => r.reason);
      assert.ok(limited.length >= 1, 'a burst of 4 over a burst allowance of 2 is limited');
      for (const e of limited) {
        assert.equal(e.code, 'rate_limited');
        assert.ok(e.retryAfterMs > 0, `retryAfterMs: ${e.retryAfterMs}`);
      }
    });

    test('no token: connect() rejects with token_required and the client stays closed', async () => {
      const mallory = client({ user: unique('mallory') });
      const closed = next(mallory, 'closed');
      const e = await rejection(mallory.connect(), 'connect without a token');
      assert.equal(e.code, 'token_required');
      assert.equal(e.status, 401);
      assert.equal((await closed).error.code, 'token_required');
      assert.equal(mallory.state, 'closed');
    });

    test('token_expiring: getToken\'s token is taken by refresh; without getToken the session ends with 4001; after a 4001 getToken is asked again', async () => {
      const carol = unique('carol');
      const fresh = mintToken(SECRET, { sub: carol, exp: inSeconds(600) });
      let asked = 0;
      const renewing = client({
        token: mintToken(SECRET, { sub: carol, exp: inSeconds(2) }),
        getToken: async () => { asked++; return fresh; },
      });
      const lapsing = client({ token: mintToken(SECRET, { sub: unique('dave'), exp: inSeconds(2) }) });
      // getToken's first token is refused (another user's): the session runs
      // out (4001), and the client asks again before it reconnects.
      const erin = unique('erin');
      const tokens = [mintToken(SECRET, { sub: unique('mallory'), exp: inSeconds(600) }),
        mintToken(SECRET, { sub: erin, exp: inSeconds(600) })];
      const late = client({ token: mintToken(SECRET, { sub: erin, exp: inSeconds(2) }), getToken: () => tokens.shift() });
      const refreshed = next(renewing, 'refreshed');
      const warned = next(lapsing, 'tokenExpiring');
      const closed = next(lapsing, 'closed');
      const refused = next(late, 'error');
      const expired = next(late, 'disconnected');
      const back = next(late, 'connected', (c) => c.reconnected);
      await Promise.all([renewing.connect(), lapsing.connect(), late.connect()]);
      assert.ok((await warned).expiresAt >= inSeconds(0));
      const { expiresAt } = await refreshed;
      assert.equal(asked, 1);
      assert.ok(expiresAt > inSeconds(500), `the fresh token's exp: ${expiresAt}`);
      const end = await closed;
      assert.equal(end.error.code, 'token_expired');
      assert.equal(end.error.closeCode, 4001);
      assert.equal(renewing.state, 'connected');
      assert.equal((await refused).code, 'invalid_token');
      const d = await expired;
      assert.equal(d.code, 4001);
      assert.equal(d.error.code, 'token_expired');
      assert.equal((await back).user, erin);
      assert.equal(tokens.length, 0, 'getToken was asked again before reconnecting');
    });

    test('over SSE with a token, POSTs carry it: allowed rooms are acked, read-only ones forbidden', async () => {
      const news = unique('news');
      const team = unique('team');
      const erin = client({
        token: mintToken(SECRET, { sub: unique('erin'), exp: inSeconds(600), rooms: [team], rooms_read: [news] }),
        transport: 'sse',
      });
      const ws = client({ token: mintToken(SECRET, { sub: unique('frank'), exp: inSeconds(600) }) });
      await Promise.all([ws.subscribe(news), ws.connect()]);
      // An event stream is for the room subscribed before it opens.
      await within(Promise.all([erin.subscribe(news), erin.connect()]), 'the event stream');
      assert.equal(erin.transport, 'sse');
      const e = await rejection(erin.send(news, 'may I?'), 'an SSE post to a read-only room');
      assert.equal(e.code, 'forbidden');
      assert.equal(e.status, 403);
      // A room the token may write needs no stream of its own: the POST is enough.
      await within(erin.send(team, 'from the stream\'s user'), 'an SSE post to a room the token allows');
      const heard = next(erin, 'message', (m) => m.text === 'news!');
      await ws.send(news, 'news!');
      await heard;
    });
  });
}
