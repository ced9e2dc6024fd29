// The Server-Sent Events + HTTP POST transport behind the same client API:
// chosen outright, and reached on its own when WebSockets never open ("auto").

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';

import { BUSES, next, rejection, serverForSuite, unique, within } from './warren.mjs';

/** A WebSocket that never opens, as behind a proxy that drops upgrades. */
class NeverOpens {
  constructor() {
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 3;
      if (this.onerror) this.onerror({ type: 'error' });
      if (this.onclose) this.onclose({ code: 1006, reason: '' });
    }, 5);
  }

  send() { throw new Error('not open'); }

  close() {}
}

/** `fetch`, but event streams are not found, as on a server without them. */
async function noStreams(url, init) {
  if (/\/events\?/.test(String(url))) {
    return new Response(JSON.stringify({ code: 'not_found', message: 'no such resource' }),
      { status: 404, headers: { 'content-type': 'application/json' } });
  }
  return fetch(url, init);
}

for (const bus of BUSES) {
  describe(`on the ${bus} bus`, () => {
    const suite = serverForSuite({ bus });
    const client = (options) => suite.client(options);

    test('over SSE: welcome, members, room and direct messages both ways, POSTs acked with their id', async () => {
      const room = unique('r');
      const ws = client({ user: unique('wendy') });
      await Promise.all([ws.subscribe(room), ws.connect()]);
      const sse = client({ user: unique('sam'), transport: 'sse' });
      const joined = next(ws, 'presence', (p) => p.room === room && p.joins.includes(sse.user));
      const subscribed = sse.subscribe(room);
      const welcome = await sse.connect();
      assert.equal(sse.transport, 'sse');
      assert.equal(welcome.user, sse.user);
      assert.ok((await subscribed).members.has(ws.user));
      await joined;

      const toSse = next(sse, 'message', (m) => m.text === 'to the stream');
      await ws.send(room, 'to the stream');
      assert.equal((await toSse).from, ws.user);

      const fromSse = next(ws, 'message', (m) => m.text === 'from a POST');
      const echo = next(sse, 'message', (m) => m.text === 'from a POST');
      const { id } = await within(sse.send(room, 'from a POST'), 'the POST');
      assert.equal((await fromSse).id, id);
      assert.equal((await echo).id, id);

      const dm = next(ws, 'direct', (m) => m.text === 'psst over HTTP');
      await within(sse.sendDirect(ws.user, 'psst over HTTP'), 'the direct POST');
      assert.equal((await dm).from, sse.user);
      const back = next(sse, 'direct', (m) => m.text === 'and back');
      await ws.sendDirect(sse.user, 'and back');
      await back;

      const offline = await rejection(sse.sendDirect(unique('nobody'), 'anyone?'), 'a direct POST to nobody');
      assert.equal(offline.code, 'user_not_found');
      assert.equal(offline.status, 404);
      const second = await rejection(sse.subscribe(unique('r')), 'a second room over SSE');
      assert.equal(second.code, 'sse_one_room');

      const left = next(ws, 'presence', (p) => p.room === room && p.leaves.includes(sse.user));
      sse.close();
      await left;
    });

    test('auto: WebSockets that never open give way to SSE, with the same API', async () => {
      const room = unique('r');
      const ws = client({ user: unique('walt') });
      await Promise.all([ws.subscribe(room), ws.connect()]);
      const fallback = client({ user: unique('faye'), WebSocket: NeverOpens, wsFailuresBeforeSse: 2 });
      const switched = next(fallback, 'transport');
      const subscribed = fallback.subscribe(room);
      await fallback.connect();
      assert.equal((await switched).transport, 'sse');
      assert.equal(fallback.transport, 'sse');
      await subscribed;
      const heard = next(ws, 'message', (m) => m.text === 'fell back fine');
      await within(fallback.send(room, 'fell back fine'), 'the POST after the fallback');
      await heard;
    });

    test('no event streams on the server: "sse" stops with sse_unsupported, "auto" goes back to WebSocket', async () => {
      const room = unique('r');
      const sse = client({ user: unique('sue'), transport: 'sse', fetch: noStreams });
      sse.subscribe(room).catch(() => {});
      const e = await rejection(sse.connect(), 'an SSE connect with no streams');
      assert.equal(e.code, 'sse_unsupported');
      assert.equal(sse.state, 'closed');

      const auto = client({ user: unique('al'), WebSocket: NeverOpens, wsFailuresBeforeSse: 1, fetch: noStreams });
      auto.subscribe(room).catch(() => {});
      const toSse = next(auto, 'transport', (t) => t.transport === 'sse');
      const back = next(auto, 'transport', (t) => t.transport === 'ws');
      auto.connect().catch(() => {});
      await toSse;
      assert.equal((await back).reason.code, 'sse_unsupported');
    });
  });
}
