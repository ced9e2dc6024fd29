// warren-client: a client for Warren's wire protocol v2 (docs/PROTOCOL.md),
// for browsers and Node >= 20. One file, no dependencies.
//
// A WarrenClient holds one session with a Warren server and keeps it: it
// connects over a WebSocket (or a Server-Sent Events stream with HTTP POST for
// sending, the same API), reconnects with exponential backoff and full jitter
// as the close codes allow, subscribes its rooms again after a reconnect,
// keeps each room's member set live from `presence` frames, and refreshes the
// application's token before it runs out. Over a WebSocket it acknowledges
// what its listeners processed (`acks=client`, `ack_upto`) and, after a lost
// connection, resumes its session (`?resume=`) so that nothing sent meanwhile
// is lost or shown twice; when the server could not keep the session, it asks
// each room's history since the last message it saw.
//
// Layout, top to bottom:
//   WarrenError       every failure the client reports: a code and fields
//   backoffDelay      the reconnect delay (exported for tests)
//   SocketTransport   one WebSocket: frames both ways
//   StreamTransport   one event stream read with fetch: frames one way
//   WarrenClient      the lifecycle: connect, welcome, subscriptions,
//                     requests (send, subscribe, refresh) and their answers,
//                     presence, and what to do when a transport ends
//
// Client-side error codes, next to the server's (PROTOCOL.md, "Error codes"):
//   not_connected      nothing was sent: the client is not connected
//   connection_lost    sent, but the connection ended before the answer: the
//                      message may or may not have been delivered
//   closed             the client was closed (close(), or a final refusal)
//   closed_by_server   the server closed with a code that retrying would not
//                      cure (1002, 1007, 1008): see `closeCode`
//   unreachable        the server could not be reached at all
//   connect_failed     the server is up, but the connection did not open
//   sse_one_room       an event stream carries exactly one room
//   sse_needs_room     subscribe to a room before connecting over SSE
//   sse_unsupported    the server (or this runtime) has no event streams
//   websocket_unsupported  no WebSocket here: pass the `WebSocket` option

const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;

/** Handshake refusals that retrying cannot cure: someone has to change something. */
const FINAL_REFUSALS = new Set([
  'invalid_user', 'invalid_room', 'origin_not_allowed', 'token_required',
  'invalid_token', 'token_expired', 'forbidden', 'too_many_sessions',
]);

/**
 * Close codes after which reconnecting would fail the same way: "fix the
 * client" in PROTOCOL.md's close-code table. Every other code is retried
 * (1001, 1006, 1009, 1011, 1012, 1013); 4001 is retried with a fresh token.
 */
const FINAL_CLOSE_CODES = new Set([1002, 1007, 1008]);
const CLOSE_TOKEN_EXPIRED = 4001;
const CLOSE_RESTARTING = 1012;

/** A failure the client reports: a server error code, or one of the client's own. */
export class WarrenError extends Error {
  /**
   * @param {string} code
   * @param {string} [message]
   * @param {object} [fields] `ref`, `retryAfterMs`, `status`, `closeCode`, `closeReason`, `frame`
   */
  constructor(code, message, fields) {
    super(message || code);
    this.name = 'WarrenError';
    this.code = code;
    if (fields) {
      for (const [key, value] of Object.entries(fields)) {
        if (value !== undefined) this[key] = value;
      }
    }
  }

  /** An `error` frame, or the JSON error body of an HTTP answer. */
  static from(body, fields) {
    const code = typeof body.code === 'string' ? body.code : 'error';
    return new WarrenError(code, typeof body.message === 'string' ? body.message : code, {
      ref: typeof body.ref === 'string' ? body.ref : undefined,
      retryAfterMs: typeof body.retry_after_ms === 'number' ? body.retry_after_ms : undefined,
      frame: body,
      ...fields,
    });
  }
}

/**
 * The wait before reconnect attempt `attempt` (0 for the first): full jitter,
 * uniformly random between 0 and min(cap, base * 2^attempt).
 */
export function backoffDelay(attempt, baseMs, capMs, random = Math.random) {
  const ceiling = Math.min(capMs, baseMs * Math.pow(2, attempt));
  return Math.floor(random() * ceiling);
}

// ------------------------------------------------------------------ transports
// A transport carries one session. It calls `events.open()` once it is open,
// `events.frame(f)` for every server frame, and `events.end(why)` exactly once
// when it ends on its own; after `close()` it calls nothing.

/** One WebSocket: server frames in, client frames out. */
class SocketTransport {
  constructor(url, WebSocketImpl, events) {
    this.kind = 'ws';
    this.opened = false;
    this.ended = false;
    this.socket = new WebSocketImpl(url);
    this.socket.onopen = () => {
      if (this.ended) return;
      this.opened = true;
      events.open();
    };
    this.socket.onmessage = (ev) => {
      if (this.ended || typeof ev.data !== 'string') return;
      const frame = parseFrame(ev.data);
      if (frame) events.frame(frame);
    };
    const end = (code, reason) => {
      if (this.ended) return;
      this.ended = true;
      events.end({ opened: this.opened, code, reason });
    };
    // Browsers fire `close` right after `error`, with the real code. Node 20's
    // WebSocket fires only `error` when it cannot connect: end it ourselves
    // if no `close` has come by the next turn.
    this.socket.onerror = () => setTimeout(() => end(1006, ''), 0);
    this.socket.onclose = (ev) => end(ev.code, ev.reason || '');
  }

  /** Sends one frame; false when the socket is not open. */
  send(frame) {
    if (this.ended || this.socket.readyState !== 1 /* OPEN */) return false;
    this.socket.send(JSON.stringify(frame));
    return true;
  }

  close() {
    this.ended = true;
    try { this.socket.close(1000, 'client closed'); } catch (_) { /* already closing */ }
  }
}

/**
 * One Server-Sent Events stream, read with `fetch` rather than `EventSource`:
 * the same code runs in browsers and in Node, a refused stream shows its
 * status and JSON body, and Warren's `error` events cannot be mistaken for
 * connection trouble.
 */
class StreamTransport {
  constructor(url, fetchImpl, events) {
    this.kind = 'sse';
    this.opened = false;
    this.ended = false;
    this.abort = typeof AbortController === 'function' ? new AbortController() : null;
    this.run(url, fetchImpl, events);
  }

  async run(url, fetchImpl, events) {
    let res;
    try {
      res = await fetchImpl(url, {
        headers: { Accept: 'text/event-stream' },
        cache: 'no-store',
        signal: this.abort ? this.abort.signal : undefined,
      });
    } catch (_) {
      this.finish(events, { opened: false, unreachable: true });
      return;
    }
    const type = (res.headers.get('content-type') || '').toLowerCase();
    if (!res.ok || !type.includes('text/event-stream') || !res.body) {
      const body = await readJson(res);
      this.finish(events, { opened: false, status: res.status, body });
      return;
    }
    if (this.ended) return;
    this.opened = true;
    events.open();
    try {
      await readEvents(res.body, (frame) => { if (!this.ended) events.frame(frame); });
    } catch (_) { /* the stream broke: it ended all the same */ }
    this.finish(events, { opened: true });
  }

  finish(events, why) {
    if (this.ended) return;
    this.ended = true;
    events.end(why);
  }

  /** Event streams carry frames one way: clients send over HTTP. */
  send() { return false; }

  close() {
    this.ended = true;
    if (this.abort) this.abort.abort();
  }
}

/** Reads `text/event-stream` from a byte stream, calling `onFrame` per event. */
async function readEvents(body, onFrame) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let name = '';
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === '') {
        // A blank line ends an event; one without data is nothing.
        if (data.length) {
          const frame = parseFrame(data.join('\n'));
          if (frame) {
            if (typeof frame.type !== 'string') frame.type = name || 'message';
            onFrame(frame);
          }
        }
        name = '';
        data = [];
      } else if (line.charAt(0) !== ':') { // ':' starts a keep-alive comment
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.charAt(0) === ' ') text = text.slice(1);
        if (field === 'event') name = text;
        else if (field === 'data') data.push(text);
        // `id` is ignored: Warren keeps no history to resume from (yet).
      }
    }
  }
}

function parseFrame(text) {
  try {
    const frame = JSON.parse(text);
    return frame && typeof frame === 'object' && !Array.isArray(frame) ? frame : null;
  } catch (_) {
    return null;
  }
}

async function readJson(res) {
  try {
    const body = await res.json();
    return body && typeof body === 'object' ? body : {};
  } catch (_) {
    return {};
  }
}

function names(list) {
  return Array.isArray(list) ? list.filter((n) => typeof n === 'string' && n !== '') : [];
}

// ------------------------------------------------------------------ the client

/**
 * A Warren session that keeps itself connected.
 *
 * Events (`client.on(name, fn)`): `state`, `connecting`, `connected`,
 * `disconnected`, `closed`, `transport`, `subscribed`, `unsubscribed`,
 * `subscribeError`, `presence`, `message`, `direct`, `error`,
 * `tokenExpiring`, `refreshed`, `frame`. See warren-client.d.ts.
 */
export class WarrenClient {
  // Options, fixed at construction.
  #base;
  #WebSocket;
  #fetch;
  #mode;
  #user;
  #getToken;
  #baseMs;
  #capMs;
  #wsFailuresBeforeSse;
  #resume;
  #ackDelayMs;

  /** The application's token (JWT), if any; replaced by refresh(). */
  #token;
  /** The token is known to have run out: get a fresh one before connecting. */
  #tokenStale = false;

  // The connection.
  #state = 'idle';
  /** The transport in use or being opened; its callbacks check they still are. */
  #transport = null;
  /** Which transport the next connection uses: 'ws' or 'sse'. */
  #kind = 'ws';
  /** Bumped by every open() and close(), so work begun before one is dropped. */
  #epoch = 0;
  /** Reconnect attempts since the last `welcome`: the backoff's exponent. */
  #attempt = 0;
  #retryTimer = null;
  /** Consecutive WebSockets that never opened although the server would take them. */
  #wsFailures = 0;
  /** The server has no event streams: "auto" stays on WebSocket. */
  #sseUnsupported = false;
  #everConnected = false;
  #connectWaiters = [];

  // The session.
  #welcome = null;

  // Acknowledgements and resume (WebSocket only).
  /** The highest `seq` delivered to our listeners on this connection, and the highest acknowledged. */
  #seq = 0;
  #ackedSeq = 0;
  #ackTimer = null;
  /** The id of the last message or direct message our listeners processed. */
  #lastId;
  /** The session to resume on the next connection, and its rooms. */
  #resumeFrom = null;

  /** room -> { state: 'pending'|'subscribed', members: Set, total, everSubscribed, waiters } */
  #rooms = new Map();
  /** ref -> a request awaiting its answer: { kind, room?, resolve, reject } */
  #requests = new Map();
  #refs = 0;
  #listeners = new Map();

  /**
   * @param {object} options see warren-client.d.ts (`WarrenClientOptions`)
   */
  constructor(options = {}) {
    const base = options.url || (typeof location !== 'undefined' ? location.origin : '');
    if (!base) throw new TypeError('warren-client: `url` is required outside a browser');
    // http(s):// or ws(s)://; the path, if any, is where Warren is mounted.
    this.#base = String(base).replace(/^ws(s?):/i, 'http$1:').replace(/\/+$/, '');
    this.#WebSocket = options.WebSocket;
    this.#fetch = options.fetch;
    this.#mode = options.transport === 'websocket' || options.transport === 'ws' ? 'ws'
      : options.transport === 'sse' ? 'sse' : 'auto';
    this.#user = options.user;
    this.#token = options.token;
    this.#getToken = typeof options.getToken === 'function' ? options.getToken : null;
    const backoff = options.backoff || {};
    this.#baseMs = backoff.baseMs ?? 500;
    this.#capMs = backoff.capMs ?? 15000;
    this.#wsFailuresBeforeSse = options.wsFailuresBeforeSse ?? 3;
    this.#resume = options.resume !== false;
    this.#ackDelayMs = options.ackDelayMs ?? 100;
    this.#kind = this.#mode === 'sse' ? 'sse' : 'ws';
  }

  // ---------------------------------------------------------------- reading

  /** 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed' */
  get state() { return this.#state; }
  /** The transport in use (or the next one tried): 'ws' or 'sse'. */
  get transport() { return this.#kind; }
  /** Our user id, from the last `welcome` (a guest learns it there). */
  get user() { return this.#welcome ? this.#welcome.user : this.#user; }
  /** This connection's session id, from the last `welcome`. */
  get session() { return this.#welcome ? this.#welcome.session : undefined; }
  /** The node serving us, from the last `welcome` (for diagnostics). */
  get node() { return this.#welcome ? this.#welcome.node : undefined; }
  /** The rooms we are subscribed to now. */
  get rooms() {
    return [...this.#rooms].filter(([, s]) => s.state === 'subscribed').map(([room]) => room);
  }

  /** Who is in `room` as far as we know (ourselves included while subscribed): a copy. */
  members(room) {
    const sub = this.#rooms.get(room);
    return new Set(sub ? sub.members : []);
  }

  // ---------------------------------------------------------------- events

  /** Calls `fn(detail)` on every `name` event; returns a function that stops it. */
  on(name, fn) {
    let set = this.#listeners.get(name);
    if (!set) { set = new Set(); this.#listeners.set(name, set); }
    set.add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    const set = this.#listeners.get(name);
    if (set) set.delete(fn);
  }

  #emit(name, detail) {
    const set = this.#listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(detail);
      } catch (e) {
        // A listener's bug must not break the connection: report it apart.
        queueMicrotask(() => { throw e; });
      }
    }
  }

  #setState(state) {
    if (this.#state === state) return;
    const previous = this.#state;
    this.#state = state;
    this.#emit('state', { state, previous });
  }

  // ---------------------------------------------------------------- lifecycle

  /**
   * Starts connecting (if not already) and resolves with the `welcome` once
   * connected; rejects if the client closes first (a final refusal).
   */
  connect() {
    if (this.#state === 'connected') return Promise.resolve(this.#welcome);
    const connected = new Promise((resolve, reject) => this.#connectWaiters.push({ resolve, reject }));
    if (this.#state === 'idle' || this.#state === 'closed') {
      this.#attempt = 0;
      this.#wsFailures = 0;
      this.#kind = this.#mode === 'sse' ? 'sse' : 'ws';
      this.#open();
    }
    return connected;
  }

  /** Ends the session for good (until connect() again). Pending requests reject with `closed`. */
  close() {
    if (this.#state === 'idle' || this.#state === 'closed') return;
    this.#finish(null);
  }

  /** Skips the wait before the next reconnect attempt (a "retry now" button, going online). */
  reconnectNow() {
    if (this.#state !== 'disconnected') return;
    this.#attempt = 0;
    this.#open();
  }

  async #open() {
    this.#cancelRetry();
    const epoch = ++this.#epoch;
    this.#setState('connecting');
    this.#emit('connecting', { transport: this.#kind, attempt: this.#attempt, reconnect: this.#everConnected });
    if (this.#tokenStale || (this.#token === undefined && this.#getToken)) {
      if (!this.#getToken) {
        this.#finish(new WarrenError('token_expired', 'the token expired and there is no getToken to renew it'));
        return;
      }
      try {
        this.#token = await this.#getToken();
        this.#tokenStale = false;
      } catch (e) {
        if (epoch !== this.#epoch) return;
        this.#ended({ kind: this.#kind, opened: false, error: asError(e, 'token_unavailable') });
        return;
      }
      if (epoch !== this.#epoch) return;
    }
    if (this.#kind === 'sse') this.#openStream();
    else this.#openSocket();
  }

  #openSocket() {
    const WebSocketImpl = this.#WebSocket || globalThis.WebSocket;
    if (typeof WebSocketImpl !== 'function') {
      this.#finish(new WarrenError('websocket_unsupported',
        'no WebSocket here: pass the WebSocket option (Node 20: run with --experimental-websocket)'));
      return;
    }
    let transport = null;
    const events = {
      open: () => { /* the `welcome` frame makes us connected */ },
      frame: (f) => { if (transport === this.#transport) this.#onFrame(f); },
      end: (why) => { if (transport === this.#transport) this.#socketEnded(why); },
    };
    try {
      transport = new SocketTransport(this.#wsUrl(), WebSocketImpl, events);
    } catch (e) {
      this.#ended({ kind: 'ws', opened: false, error: asError(e, 'connect_failed') });
      return;
    }
    this.#transport = transport;
  }

  #openStream() {
    const fetchImpl = this.#fetchImpl();
    if (!fetchImpl || typeof TextDecoder !== 'function') {
      this.#finish(new WarrenError('sse_unsupported', 'no fetch here to read an event stream with'));
      return;
    }
    const room = this.#rooms.keys().next().value;
    if (room === undefined) {
      this.#finish(new WarrenError('sse_needs_room', 'an event stream is for one room: subscribe to it before connecting'));
      return;
    }
    let transport = null;
    const events = {
      open: () => { /* the `welcome` event makes us connected */ },
      frame: (f) => { if (transport === this.#transport) this.#onFrame(f); },
      end: (why) => { if (transport === this.#transport) this.#ended({ kind: 'sse', ...why }); },
    };
    const url = this.#base + '/rooms/' + encodeURIComponent(room) + '/events?' + this.#query();
    transport = new StreamTransport(url, fetchImpl, events);
    this.#transport = transport;
  }

  /** A WebSocket ended. One that never opened: ask the server why. */
  #socketEnded(why) {
    if (why.opened) {
      this.#ended({ kind: 'ws', ...why });
      return;
    }
    // Browsers hide the status of a refused upgrade; a plain GET of the same
    // URL answers with the refusal the upgrade got (or 426: it would accept).
    const epoch = this.#epoch;
    const fetchImpl = this.#fetchImpl();
    const probe = fetchImpl
      ? fetchImpl(this.#base + '/ws?' + this.#query(), { headers: { Accept: 'application/json' }, cache: 'no-store' })
        .then(async (res) => ({ status: res.status, body: await readJson(res) }), () => ({ unreachable: true }))
      : Promise.resolve({});
    probe.then((answer) => {
      if (epoch !== this.#epoch) return;
      this.#ended({ kind: 'ws', ...why, ...answer });
    });
  }

  /**
   * A transport ended on its own: settle what waited on it, then decide
   * between reconnecting (after a backoff) and stopping for good.
   *
   * `why`: { kind, opened, code?, reason? } for an ended socket or stream;
   * { status?, body?, unreachable? } for one that never opened; { error? }.
   */
  #ended(why) {
    this.#transport = null;
    if (this.#ackTimer) clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    this.#rememberResume(why);
    const lost = new WarrenError('connection_lost', why.code
      ? `the connection closed (${why.code}${why.reason ? ' ' + why.reason : ''}) before the server answered`
      : 'the connection ended before the server answered', { closeCode: why.code, closeReason: why.reason });
    this.#settleRequests(lost);
    for (const sub of this.#rooms.values()) sub.state = 'pending';

    let error = why.error || null;
    let retry = true;
    const refusal = why.body && typeof why.body.code === 'string' ? WarrenError.from(why.body, { status: why.status }) : null;
    if (why.kind === 'sse' && !why.opened && (why.status === 404 || why.status === 405)) {
      // No event streams here (an older server, or a proxy that has no route for them).
      error = new WarrenError('sse_unsupported', 'this server does not offer Server-Sent Events', { status: why.status });
      if (this.#mode === 'auto') {
        this.#sseUnsupported = true;
        this.#switchTransport('ws', error);
      } else {
        retry = false;
      }
    } else if (why.opened) {
      if (why.kind === 'ws' && why.code === CLOSE_TOKEN_EXPIRED) {
        error = new WarrenError('token_expired', why.reason || 'token expired', { closeCode: why.code });
        this.#tokenStale = true;
        retry = this.#getToken !== null;
        this.#attempt = 0;
      } else if (why.kind === 'ws' && FINAL_CLOSE_CODES.has(why.code)) {
        error = new WarrenError('closed_by_server', why.reason || `closed with ${why.code}`,
          { closeCode: why.code, closeReason: why.reason });
        retry = false;
      } else if (why.code === CLOSE_RESTARTING) {
        this.#attempt = 0; // "reconnect at once": the draining node sends us elsewhere
      }
    } else if (refusal) {
      error = refusal;
      if (refusal.code === 'token_expired' && this.#getToken) {
        this.#tokenStale = true;
      } else if (FINAL_REFUSALS.has(refusal.code)) {
        retry = false;
      } else if (refusal.code === 'upgrade_required') {
        // The server would take us, but the WebSocket never opened:
        // something between us refuses upgrades.
        error = new WarrenError('connect_failed', 'the WebSocket did not open', { status: why.status });
        this.#countWsFailure();
      }
    } else if (why.unreachable) {
      error = error || new WarrenError('unreachable', 'cannot reach the server');
    } else if (!error && why.status !== undefined) {
      // An answer without Warren's JSON: something in between refused us.
      error = new WarrenError('connect_failed', `the server answered ${why.status}`, { status: why.status });
      if (why.kind === 'ws') this.#countWsFailure();
    }

    if (!retry) {
      this.#finish(error, why);
      return;
    }
    const delayMs = backoffDelay(this.#attempt, this.#baseMs, this.#capMs);
    this.#attempt++;
    this.#setState('disconnected');
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      this.#open();
    }, delayMs);
    this.#emit('disconnected', {
      transport: why.kind,
      opened: !!why.opened,
      code: why.code,
      reason: why.reason,
      error,
      willRetry: true,
      delayMs,
    });
  }

  /**
   * A WebSocket session the server offered to keep can be resumed on the next
   * connection, with the rooms it was in. Not after a close that ends the
   * session on the server (ours, or one for a fault of ours).
   */
  #rememberResume(why) {
    const w = this.#welcome;
    if (!this.#resume || why.kind !== 'ws' || !why.opened || !w || !w.resume_grace_secs) return;
    if (FINAL_CLOSE_CODES.has(why.code) || why.code === 1009) return;
    const rooms = [...this.#rooms].filter(([, s]) => s.state === 'subscribed').map(([room]) => room);
    this.#resumeFrom = { session: w.session, user: w.user, rooms, lastId: this.#lastId };
  }

  /** In "auto", enough WebSockets that never opened move us to an event stream. */
  #countWsFailure() {
    if (this.#mode !== 'auto' || this.#sseUnsupported || this.#rooms.size === 0) return;
    this.#wsFailures++;
    if (this.#wsFailures < this.#wsFailuresBeforeSse) return;
    this.#wsFailures = 0;
    this.#attempt = 0;
    this.#switchTransport('sse', new WarrenError('connect_failed',
      `the WebSocket did not open ${this.#wsFailuresBeforeSse} times`));
  }

  #switchTransport(kind, because) {
    if (this.#kind === kind) return;
    this.#kind = kind;
    this.#emit('transport', { transport: kind, reason: because });
  }

  /** Stops for good: `error` says why (null: close() was called). */
  #finish(error, why) {
    this.#cancelRetry();
    this.#epoch++;
    const transport = this.#transport;
    this.#transport = null;
    if (transport) transport.close();
    const closed = error || new WarrenError('closed', 'the client was closed');
    this.#settleRequests(closed);
    for (const sub of this.#rooms.values()) {
      sub.state = 'pending';
      rejectAll(sub.waiters, closed);
    }
    this.#setState('closed');
    rejectAll(this.#connectWaiters, closed);
    this.#emit('closed', { error, code: why && why.code, reason: why && why.reason });
  }

  #cancelRetry() {
    if (this.#retryTimer) clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
  }

  // ---------------------------------------------------------------- frames

  #onFrame(f) {
    this.#emit('frame', f);
    switch (f.type) {
      case 'welcome': return this.#onWelcome(f);
      case 'subscribed': return this.#onSubscribed(f);
      case 'unsubscribed': return this.#onUnsubscribed(f);
      case 'message': {
        const sub = typeof f.room === 'string' ? this.#rooms.get(f.room) : undefined;
        // Catching up from history after a resume that did not recover:
        // live messages wait for the page, so nothing comes twice or out of
        // order (and they are acknowledged once they are passed on).
        if (sub && sub.catchingUp) { sub.catchingUp.push(f); return; }
        if (sub) this.#passOn(sub, f);
        return this.#delivered(f); // acknowledged even if we left the room
      }
      case 'direct':
        this.#emit('direct', f);
        return this.#delivered(f);
      case 'resumed': return this.#onResumed(f);
      case 'delivered': return this.#emit('delivered', { id: f.id, to: f.to });
      // Our queue on the server overflowed: messages were lost here. Not a
      // delivery: it carries no seq and is not acknowledged.
      case 'gap': return this.#emit('gap', {
        room: typeof f.room === 'string' ? f.room : null,
        missed: Number(f.missed) || 0,
      });
      case 'history': return this.#onHistory(f);
      case 'presence': return this.#onPresence(f);
      case 'ack': return this.#answer(f.ref, (req) => req.resolve({ id: String(f.id) }));
      case 'refreshed': return this.#onRefreshed(f);
      case 'token_expiring': return this.#onTokenExpiring(f);
      case 'error': return this.#onError(f);
      default: return; // newer frame types: ignored on purpose
    }
  }

  /**
   * Every delivered chat frame passes here once its listeners have run: it is
   * processed. Acknowledge it (soon, in batches) and remember its id for a
   * resume.
   */
  #delivered(frame) {
    if (typeof frame.id === 'string') this.#lastId = frame.id;
    if (typeof frame.seq !== 'number' || frame.seq <= this.#seq) return;
    this.#seq = frame.seq;
    const window = this.#welcome && this.#welcome.ack_window ? this.#welcome.ack_window : 256;
    if (this.#seq - this.#ackedSeq >= window / 4) {
      this.#sendAck();
    } else if (!this.#ackTimer) {
      this.#ackTimer = setTimeout(() => { this.#ackTimer = null; this.#sendAck(); }, this.#ackDelayMs);
    }
  }

  #sendAck() {
    if (this.#ackTimer) clearTimeout(this.#ackTimer);
    this.#ackTimer = null;
    if (this.#seq <= this.#ackedSeq || !this.#transport) return;
    if (this.#transport.send({ type: 'ack_upto', seq: this.#seq })) this.#ackedSeq = this.#seq;
  }

  /**
   * The answer to our `?resume=`. Recovered: what we missed follows. Not: the
   * server subscribed our rooms afresh; ask each for what came after the last
   * message we saw (as far as the server's history goes).
   */
  #onResumed(f) {
    const recovered = f.recovered === true;
    const rooms = Array.isArray(f.rooms) ? f.rooms : [];
    if (!recovered) {
      for (const room of rooms) {
        const sub = this.#rooms.get(room);
        if (sub && sub.lastId) {
          sub.catchingUp = [];
          this.#sendSubscribe(room, { since: sub.lastId });
        }
      }
    }
    this.#emit('resumed', { session: f.session, recovered, rooms });
  }

  /** A page of a room's history: each message to the listeners, as if live, flagged. */
  #onHistory(f) {
    const sub = this.#rooms.get(f.room);
    if (!sub) return;
    const messages = Array.isArray(f.messages) ? f.messages : [];
    this.#emit('history', { room: f.room, messages, complete: f.complete === true });
    for (const m of messages) {
      if (!m || m.type !== 'message') continue;
      if (this.#passOn(sub, { ...m, history: true }) && typeof m.id === 'string') this.#lastId = m.id;
    }
    // The live messages that came while the page was on its way, after it
    // (those it held already are not passed on twice).
    const held = sub.catchingUp;
    sub.catchingUp = null;
    for (const f of held || []) {
      this.#passOn(sub, f);
      this.#delivered(f);
    }
  }

  /**
   * A room's message to the listeners, unless its id was passed on lately
   * (a history page may hold messages already seen live: one asked `since`
   * an id the server no longer holds starts from the oldest it keeps).
   * Whether it was passed on.
   */
  #passOn(sub, m) {
    if (typeof m.id === 'string') {
      if (sub.recent.has(m.id)) return false;
      sub.recent.add(m.id);
      // The oldest id goes once 1,024 are remembered.
      if (sub.recent.size > 1024) sub.recent.delete(sub.recent.values().next().value);
      sub.lastId = m.id;
    }
    this.#emit('message', m);
    return true;
  }

  #onWelcome(f) {
    this.#welcome = f;
    this.#attempt = 0;
    // A new connection counts its deliveries from 1.
    this.#seq = 0;
    this.#ackedSeq = 0;
    // Held messages of the last connection were never acknowledged: they
    // come again, from the queue or from history.
    for (const sub of this.#rooms.values()) sub.catchingUp = null;
    const resumed = this.#resumeFrom;
    this.#resumeFrom = null;
    if (this.#kind === 'ws') this.#wsFailures = 0;
    const reconnected = this.#everConnected;
    this.#everConnected = true;
    this.#setState('connected');
    // Our rooms first, so that a listener subscribing on `connected` is not asked twice.
    if (this.#kind === 'ws') {
      // A WebSocket starts in no room: subscribe to every room we hold, but
      // those a resume restores (the server sends their `subscribed`).
      const restored = new Set(resumed ? resumed.rooms : []);
      for (const room of this.#rooms.keys()) {
        if (!restored.has(room)) this.#sendSubscribe(room);
      }
    } else {
      // An event stream is subscribed by its URL to its one room.
      for (const room of [...this.#rooms.keys()]) {
        if (room === f.room) {
          this.#onSubscribed({ room, members: f.members, members_total: f.members_total });
        } else {
          this.#dropRoom(room, new WarrenError('sse_one_room', `an event stream carries one room (#${f.room}), not #${room}`));
        }
      }
    }
    this.#emit('connected', {
      user: f.user, session: f.session, node: f.node, transport: this.#kind, reconnected, welcome: f,
    });
    const waiters = this.#connectWaiters;
    this.#connectWaiters = [];
    for (const w of waiters) w.resolve(f);
  }

  #onSubscribed(f) {
    if (typeof f.ref === 'string') this.#requests.delete(f.ref);
    const sub = this.#rooms.get(f.room);
    if (!sub) return; // unsubscribed since
    sub.state = 'subscribed';
    sub.members = new Set(names(f.members));
    // We are in the room while subscribed, whatever the list says.
    if (this.user) sub.members.add(this.user);
    sub.total = typeof f.members_total === 'number' ? f.members_total : sub.members.size;
    const restored = sub.everSubscribed;
    sub.everSubscribed = true;
    const detail = { room: f.room, members: new Set(sub.members), membersTotal: sub.total, restored };
    const waiters = sub.waiters;
    sub.waiters = [];
    for (const w of waiters) w.resolve(detail);
    this.#emit('subscribed', detail);
  }

  #onUnsubscribed(f) {
    this.#answer(f.ref, (req) => req.resolve());
    this.#emit('unsubscribed', { room: f.room });
  }

  /** Presence as set operations (PROTOCOL.md, "Presence"); listeners get what changed. */
  #onPresence(f) {
    const sub = this.#rooms.get(f.room);
    if (!sub || sub.state !== 'subscribed') return;
    const me = this.user;
    const joins = [];
    const leaves = [];
    const resync = Array.isArray(f.members);
    if (resync) {
      const next = new Set(names(f.members));
      if (me) next.add(me);
      for (const n of sub.members) if (!next.has(n)) leaves.push(n);
      for (const n of next) if (!sub.members.has(n)) joins.push(n);
      sub.members = next;
    } else {
      for (const n of names(f.leaves)) {
        if (n !== me && sub.members.delete(n)) leaves.push(n);
      }
      for (const n of names(f.joins)) {
        if (!sub.members.has(n)) { sub.members.add(n); joins.push(n); }
      }
    }
    if (!resync && joins.length === 0 && leaves.length === 0) return;
    this.#emit('presence', { room: f.room, joins, leaves, members: new Set(sub.members), resync });
  }

  #onTokenExpiring(f) {
    this.#emit('tokenExpiring', { expiresAt: f.expires_at });
    if (!this.#getToken) return;
    Promise.resolve()
      .then(() => this.#getToken())
      .then((token) => this.refresh(token))
      .catch((e) => this.#emit('error', asError(e, 'token_unavailable')));
  }

  #onRefreshed(f) {
    this.#answer(f.ref, (req) => req.resolve({ expiresAt: f.expires_at }));
    this.#emit('refreshed', { expiresAt: f.expires_at });
  }

  #onError(f) {
    const error = WarrenError.from(f);
    const req = typeof f.ref === 'string' ? this.#requests.get(f.ref) : undefined;
    if (!req) {
      this.#emit('error', error);
      return;
    }
    this.#requests.delete(f.ref);
    if (req.kind === 'subscribe') {
      this.#dropRoom(req.room, error);
    } else if (req.kind === 'unsubscribe' && error.code === 'not_subscribed') {
      req.resolve(); // what we wanted
    } else {
      req.reject(error);
    }
  }

  /** Settles the request `ref` answers, if we are waiting for it. */
  #answer(ref, settle) {
    if (typeof ref !== 'string') return;
    const req = this.#requests.get(ref);
    if (!req) return;
    this.#requests.delete(ref);
    settle(req);
  }

  /** The connection ended: no answer will come to what it carried. */
  #settleRequests(error) {
    const requests = [...this.#requests.values()];
    this.#requests.clear();
    for (const req of requests) {
      if (req.kind === 'unsubscribe') req.resolve(); // the session and its rooms are gone
      else if (req.reject) req.reject(error);
      // A subscribe has no promise of its own: its room is asked again on reconnect.
    }
  }

  // ---------------------------------------------------------------- subscriptions

  /**
   * Subscribes to `room`, now and after every reconnect. Resolves with the
   * room's members once subscribed; rejects with the server's refusal
   * (`forbidden`, `too_many_rooms`, ...), after which the room is dropped.
   */
  subscribe(room, options = {}) {
    if (typeof room !== 'string' || !ROOM_RE.test(room)) {
      return Promise.reject(new WarrenError('invalid_room', `not a room name: ${room}`));
    }
    let sub = this.#rooms.get(room);
    if (sub && sub.state === 'subscribed') {
      return Promise.resolve({ room, members: new Set(sub.members), membersTotal: sub.total, restored: false });
    }
    if (!sub && this.#kind === 'sse' && this.#state === 'connected') {
      return Promise.reject(new WarrenError('sse_one_room', 'an event stream carries one room: use a WebSocket for more'));
    }
    if (!sub) {
      const history = Number.isInteger(options.history) && options.history > 0 ? options.history : undefined;
      sub = { state: 'pending', members: new Set(), total: 0, everSubscribed: false, waiters: [], history, lastId: undefined, recent: new Set() };
      this.#rooms.set(room, sub);
      if (this.#state === 'connected') this.#sendSubscribe(room);
    }
    const s = sub;
    return new Promise((resolve, reject) => s.waiters.push({ resolve, reject }));
  }

  /**
   * Asks for `room`: with the history its subscribe() asked for the first
   * time, then (after a reconnect) what came after the last message seen.
   */
  #sendSubscribe(room, ask = {}) {
    const ref = 's' + ++this.#refs;
    this.#requests.set(ref, { kind: 'subscribe', room });
    const sub = this.#rooms.get(room);
    const frame = { type: 'subscribe', room, ref };
    if (ask.since) frame.since = ask.since;
    else if (sub && sub.lastId && this.#kind === 'ws') frame.since = sub.lastId;
    else if (sub && sub.history && !sub.everSubscribed) frame.history = sub.history;
    if (!this.#transport || !this.#transport.send(frame)) {
      this.#requests.delete(ref); // not open after all: asked again on reconnect
    }
  }

  #dropRoom(room, error) {
    const sub = this.#rooms.get(room);
    if (!sub) return;
    this.#rooms.delete(room);
    rejectAll(sub.waiters, error);
    this.#emit('subscribeError', { room, error });
  }

  /** Leaves `room`: no more of its messages, and not subscribed again on reconnect. */
  unsubscribe(room) {
    const sub = this.#rooms.get(room);
    if (!sub) return Promise.resolve();
    if (this.#kind === 'sse' && this.#state === 'connected') {
      return Promise.reject(new WarrenError('sse_one_room', 'an event stream is its room: close() the client instead'));
    }
    this.#rooms.delete(room);
    rejectAll(sub.waiters, new WarrenError('unsubscribed', `unsubscribed from #${room}`));
    // Connected, the server is asked even while our subscribe is in flight:
    // it takes frames in order, so the room ends unsubscribed either way.
    if (this.#state !== 'connected') {
      this.#emit('unsubscribed', { room });
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const ref = 'u' + ++this.#refs;
      this.#requests.set(ref, { kind: 'unsubscribe', room, resolve, reject });
      if (!this.#transport.send({ type: 'unsubscribe', room, ref })) {
        this.#requests.delete(ref);
        resolve();
      }
    });
  }

  // ---------------------------------------------------------------- sending

  /** Sends `text` to `room`; resolves with `{ id }` on the server's ack, rejects with a WarrenError. */
  send(room, text) {
    return this.#publish({ type: 'message', room, text });
  }

  /**
   * Sends `text` to user `to` (every connection of theirs); as send(). With
   * `{ receipt: true }` (over a WebSocket), a `delivered` event follows when
   * a connection of theirs has acknowledged it.
   */
  sendDirect(to, text, options = {}) {
    const frame = { type: 'direct', to, text };
    if (options.receipt === true) frame.receipt = true;
    return this.#publish(frame);
  }

  #publish(frame) {
    if (this.#state !== 'connected' || !this.#transport) {
      return Promise.reject(new WarrenError('not_connected', 'not connected: nothing was sent'));
    }
    if (this.#kind === 'sse') return this.#post(frame);
    return new Promise((resolve, reject) => {
      const ref = 'm' + ++this.#refs;
      this.#requests.set(ref, { kind: 'send', resolve, reject });
      if (!this.#transport.send({ ...frame, ref })) {
        this.#requests.delete(ref);
        reject(new WarrenError('not_connected', 'not connected: nothing was sent'));
      }
    });
  }

  /** Over SSE a message is an HTTP POST, and its 202 is the ack. */
  async #post(frame) {
    const direct = frame.type === 'direct';
    const path = direct
      ? '/users/' + encodeURIComponent(frame.to) + '/messages'
      : '/rooms/' + encodeURIComponent(frame.room) + '/messages';
    const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
    let body;
    if (this.#token) {
      // The application's token speaks for us.
      headers.Authorization = 'Bearer ' + this.#token;
      body = { text: frame.text };
    } else {
      // Anonymous: our session's posting token proves we are this user.
      const me = this.user;
      const token = this.#welcome ? this.#welcome.token : undefined;
      body = direct ? { from: me, text: frame.text, token } : { user: me, text: frame.text, token };
    }
    let res;
    try {
      res = await this.#fetchImpl()(this.#base + path, {
        method: 'POST', headers, body: JSON.stringify(body), cache: 'no-store',
      });
    } catch (_) {
      throw new WarrenError('connection_lost', 'the request failed: the message may or may not have been delivered');
    }
    const answer = await readJson(res);
    if (res.ok) return { id: String(answer.id) };
    if (typeof answer.code === 'string') throw WarrenError.from(answer, { status: res.status });
    const code = res.status === 413 ? 'message_too_large' : 'http_' + res.status;
    throw new WarrenError(code, `the server answered ${res.status}`, { status: res.status });
  }

  // ---------------------------------------------------------------- tokens

  /**
   * Replaces the session's token (the same user's). Over a WebSocket the
   * server answers `refreshed` ({ expiresAt }) or a refusal; over an event
   * stream, and while not connected, the token is kept for the next
   * connection and the promise resolves at once with `expiresAt: undefined`.
   */
  refresh(token) {
    const keep = () => {
      this.#token = token;
      this.#tokenStale = false;
      return { expiresAt: undefined };
    };
    if (this.#state !== 'connected' || this.#kind !== 'ws') return Promise.resolve(keep());
    return new Promise((resolve, reject) => {
      const ref = 'r' + ++this.#refs;
      // The token is ours only once the server took it: a refused one must
      // not replace the one we reconnect with.
      this.#requests.set(ref, {
        kind: 'refresh',
        resolve: (answer) => { keep(); resolve(answer); },
        reject,
      });
      if (!this.#transport.send({ type: 'refresh', token, ref })) {
        this.#requests.delete(ref);
        resolve(keep());
      }
    });
  }

  // ---------------------------------------------------------------- URLs

  /** The handshake's query: the token, and the user id if one was given. */
  #query() {
    const q = [];
    if (this.#token) q.push('token=' + encodeURIComponent(this.#token));
    if (this.#user) q.push('user=' + encodeURIComponent(this.#user));
    return q.join('&');
  }

  /** A WebSocket's query: acknowledging, and resuming the last session if we can. */
  #wsUrl() {
    let query = this.#query();
    if (this.#resume) {
      query += (query ? '&' : '') + 'acks=client';
      const r = this.#resumeFrom;
      if (r) {
        // A guest resumes as the guest id the server gave it.
        if (!this.#user && !this.#token) query += '&user=' + encodeURIComponent(r.user);
        query += '&resume=' + encodeURIComponent(r.session) + '&rooms=' + r.rooms.map(encodeURIComponent).join(',');
        if (r.lastId) query += '&last_id=' + encodeURIComponent(r.lastId);
      }
    }
    return this.#base.replace(/^http/i, 'ws') + '/ws?' + query;
  }

  #fetchImpl() {
    const f = this.#fetch || globalThis.fetch;
    return typeof f === 'function' ? f.bind(globalThis) : null;
  }
}

function rejectAll(waiters, error) {
  const list = waiters.splice(0);
  for (const w of list) w.reject(error);
}

function asError(e, code) {
  if (e instanceof WarrenError) return e;
  return new WarrenError(code, e && e.message ? e.message : String(e), { cause: e });
}
