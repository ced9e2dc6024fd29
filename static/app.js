// Warren chat page. Plain JS, no framework, no build step.
// SECURITY: every piece of user- or server-supplied text is inserted with
// textContent / createTextNode. Never use innerHTML here.
'use strict';

(function () {
  const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
  const USER_RE = /^[A-Za-z0-9_-]{1,32}$/;
  const DEFAULT_ROOM = 'lobby';

  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 15000;
  // An echo of our own message that arrives before its ack is held this long
  // waiting for the ack; after that it is shown as an ordinary message.
  const EARLY_ECHO_GRACE_MS = 5000;

  // Refusals the user has to fix by hand: never reconnect on these.
  const FATAL_CODES = new Set(['user_taken', 'invalid_user', 'invalid_room', 'origin_not_allowed']);

  const FRIENDLY = {
    user_taken: 'That name is taken in this room — pick another.',
    invalid_user: 'That name is not allowed: use 1–32 letters, digits, - or _.',
    invalid_room: 'That room name is not allowed: use 1–64 letters, digits, - or _.',
    origin_not_allowed: 'This page’s origin is not allowed to connect to the server.',
    unavailable: 'The server is busy or unavailable right now.',
    message_too_large: 'Message too large — not sent.',
  };

  const CLOSE_REASONS = {
    1001: 'server is going away',
    1006: 'connection lost',
    1009: 'message too big',
    1011: 'server error',
    1012: 'server is restarting',
    1013: 'chat service unavailable, try again later',
  };

  const LS_NAME = 'warren.name';
  const LS_ROOM = 'warren.room';

  const $ = (sel) => document.querySelector(sel);

  const el = {
    joinView: $('#join-view'),
    chatView: $('#chat-view'),
    joinForm: $('#join-form'),
    name: $('#name'),
    room: $('#room'),
    join: $('#join'),
    roomTitle: $('#room-title'),
    status: $('#status'),
    retry: $('#retry'),
    leave: $('#leave'),
    messages: $('#messages'),
    jump: $('#jump'),
    composer: $('#composer'),
    text: $('#text'),
    send: $('#send'),
    error: $('#error'),
  };

  // ---------------------------------------------------------------- state
  const state = {
    user: '',
    room: '',
    ws: null,
    gen: 0,              // bumps on every connect/leave; stale callbacks check it
    opened: false,       // current socket reached `open`
    everConnected: false,
    attempt: 0,          // backoff attempt counter, reset on welcome
    retryTimer: null,
    countdownTimer: null,
    retryAt: 0,
    refCounter: 0,
    pending: new Map(),    // ref -> element (own message awaiting ack)
    byId: new Map(),       // message id -> element (everything shown)
    earlyEchoes: new Map(),// id -> {frame, timer} own echo seen before its ack
    unread: 0,
    lastFrom: null,        // for grouping consecutive messages
    lastTs: 0,
  };

  // ---------------------------------------------------------------- helpers
  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
    const connected = kind === 'connected';
    el.send.disabled = !connected || el.text.value.trim() === '';
    el.text.placeholder = connected ? 'Message #' + state.room
      : kind === 'disconnected' ? 'Disconnected' : 'Waiting for connection…';
    el.retry.hidden = kind !== 'reconnecting' || !state.retryTimer;
    el.chatView.dataset.state = kind;
  }

  function showError(text, code) {
    el.error.textContent = text;
    if (code) el.error.dataset.code = code; else delete el.error.dataset.code;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = '';
    delete el.error.dataset.code;
    el.error.hidden = true;
  }

  function showView(which) {
    const chat = which === 'chat';
    el.joinView.hidden = chat;
    el.chatView.hidden = !chat;
    const slot = document.querySelector('.error-slot[data-slot="' + which + '"]');
    if (slot) slot.appendChild(el.error);
  }

  function pad2(n) { return n < 10 ? '0' + n : String(n); }

  function formatTime(ts) {
    const d = new Date(typeof ts === 'number' && isFinite(ts) ? ts : Date.now());
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes());
  }

  function colorClass(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return 'c' + (h % 8);
  }

  function isAtBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
  }

  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
    el.jump.hidden = true;
  }

  function updateTitle() {
    const base = state.room ? '#' + state.room + ' — Warren' : 'Warren';
    document.title = state.unread > 0 ? '(' + state.unread + ') ' + base : base;
  }

  function randomDelay(attempt) {
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * Math.pow(2, attempt));
    return Math.floor(Math.random() * ceiling); // full jitter
  }

  // ---------------------------------------------------------------- rendering
  // Builds one message element. Every text goes through textContent.
  function buildMessage(opts) {
    const li = document.createElement('li');
    li.className = 'msg';
    li.dataset.from = opts.from;
    if (opts.id) li.dataset.id = opts.id;
    if (opts.own) li.classList.add('own');

    const meta = document.createElement('div');
    meta.className = 'meta';

    const from = document.createElement('span');
    from.className = 'from ' + colorClass(opts.from);
    from.textContent = opts.from;

    const time = document.createElement('time');
    time.className = 'time';
    time.textContent = formatTime(opts.ts);
    const date = new Date(typeof opts.ts === 'number' ? opts.ts : Date.now());
    time.dateTime = date.toISOString();
    time.title = date.toLocaleString();

    meta.append(from, time);

    const text = document.createElement('div');
    text.className = 'text';
    text.textContent = opts.text;

    li.append(meta, text);

    if (opts.own) {
      const st = document.createElement('span');
      st.className = 'state';
      st.textContent = 'sending…';
      st.title = 'Waiting for the server to confirm';
      meta.appendChild(st);
    }
    return li;
  }

  function appendMessage(li, ts, forceScroll) {
    const stick = forceScroll || isAtBottom();
    // Group consecutive messages from the same sender within 5 minutes.
    const from = li.dataset.from;
    const t = typeof ts === 'number' ? ts : Date.now();
    if (state.lastFrom === from && t - state.lastTs < 5 * 60 * 1000) li.classList.add('cont');
    state.lastFrom = from;
    state.lastTs = t;

    el.messages.appendChild(li);
    if (stick) scrollToBottom();
    else el.jump.hidden = false;

    if (document.hidden && !li.classList.contains('own')) {
      state.unread++;
      updateTitle();
    }
  }

  function appendSystem(text) {
    const stick = isAtBottom();
    const li = document.createElement('li');
    li.className = 'sys';
    li.textContent = text;
    el.messages.appendChild(li);
    state.lastFrom = null;
    if (stick) scrollToBottom();
  }

  // label: short marker in the meta row; note: optional explanation below the text.
  function setMsgState(li, cls, label, title, note) {
    li.classList.remove('delivered', 'failed', 'unconfirmed');
    if (cls) li.classList.add(cls);
    let st = li.querySelector('.state');
    if (!st) {
      st = document.createElement('span');
      st.className = 'state';
      li.querySelector('.meta').appendChild(st);
    }
    st.textContent = label;
    st.title = title || '';
    let n = li.querySelector('.note');
    if (note) {
      if (!n) {
        n = document.createElement('div');
        n.className = 'note';
        li.appendChild(n);
      }
      n.textContent = note + ' ';
      if (cls === 'failed' || cls === 'unconfirmed') {
        const edit = document.createElement('button');
        edit.type = 'button';
        edit.className = 'edit';
        edit.textContent = 'Edit & resend';
        n.appendChild(edit);
      }
    } else if (n) {
      n.remove();
    }
  }

  function showIncoming(f) {
    const own = f.from === state.user;
    const li = buildMessage({ id: f.id, from: f.from, text: f.text, ts: f.ts, own: own });
    if (own) setMsgState(li, 'delivered', '✓', 'Delivered');
    state.byId.set(f.id, li);
    appendMessage(li, f.ts, false);
  }

  // ---------------------------------------------------------------- frames
  function onFrame(f) {
    if (!f || typeof f !== 'object' || typeof f.type !== 'string') return;
    switch (f.type) {
      case 'welcome': return onWelcome(f);
      case 'message': return onMessage(f);
      case 'ack': return onAck(f);
      case 'error': return onServerError(f);
      default: return; // unknown frame types are ignored on purpose
    }
  }

  function onWelcome(f) {
    state.attempt = 0;
    if (typeof f.user === 'string' && f.user) state.user = f.user;
    if (typeof f.room === 'string' && f.room) state.room = f.room;
    el.roomTitle.textContent = '#' + state.room;
    updateTitle();
    let text = 'connected as ' + state.user + ' in #' + state.room;
    if (typeof f.node === 'string' && f.node) text += ' (node ' + f.node + ')';
    setStatus('connected', text);
    el.status.title = text;
    clearError();
    appendSystem((state.everConnected ? 'Reconnected to #' : 'Joined #') + state.room + ' as ' + state.user);
    state.everConnected = true;
  }

  function onMessage(f) {
    if (typeof f.id === 'number') f.id = String(f.id);
    if (typeof f.id !== 'string' || typeof f.text !== 'string' || typeof f.from !== 'string') return;
    if (typeof f.room === 'string' && state.room && f.room !== state.room) return;
    if (state.byId.has(f.id)) return; // already shown (our own, acked; or a duplicate)

    if (f.from === state.user && state.pending.size > 0) {
      // Probably our own echo that beat its ack: hold it until the ack says
      // which pending message it is. Show it anyway if no ack claims it.
      if (state.earlyEchoes.has(f.id)) return;
      const timer = setTimeout(() => {
        if (!state.earlyEchoes.has(f.id)) return;
        state.earlyEchoes.delete(f.id);
        if (!state.byId.has(f.id)) showIncoming(f);
      }, EARLY_ECHO_GRACE_MS);
      state.earlyEchoes.set(f.id, { frame: f, timer: timer });
      return;
    }
    showIncoming(f);
  }

  function onAck(f) {
    if (typeof f.ref !== 'string') return;
    if (typeof f.id === 'number') f.id = String(f.id);
    const li = state.pending.get(f.ref);
    if (!li) return;
    state.pending.delete(f.ref);
    if (typeof f.id === 'string' && f.id) {
      li.dataset.id = f.id;
      state.byId.set(f.id, li);
      const early = state.earlyEchoes.get(f.id);
      if (early) {
        clearTimeout(early.timer);
        state.earlyEchoes.delete(f.id);
        // Prefer the server's timestamp for our own message.
        if (typeof early.frame.ts === 'number') {
          const t = li.querySelector('.time');
          if (t) t.textContent = formatTime(early.frame.ts);
        }
      }
    }
    setMsgState(li, 'delivered', '✓', 'Delivered');
  }

  function onServerError(f) {
    const code = typeof f.code === 'string' ? f.code : 'error';
    const msg = typeof f.message === 'string' && f.message ? f.message : (FRIENDLY[code] || code);
    if (typeof f.ref === 'string' && state.pending.has(f.ref)) {
      const li = state.pending.get(f.ref);
      state.pending.delete(f.ref);
      setMsgState(li, 'failed', 'not sent', msg, FRIENDLY[code] || msg);
      li.dataset.error = code;
      return;
    }
    showError(FRIENDLY[code] && code !== 'message_too_large' ? FRIENDLY[code] + ' (' + msg + ')' : msg, code);
  }

  // ---------------------------------------------------------------- connection
  function wsUrl() {
    const q = 'room=' + encodeURIComponent(state.room) + '&user=' + encodeURIComponent(state.user);
    return (location.protocol === 'https:' ? 'wss' : 'ws') + '://' + location.host + '/ws?' + q;
  }

  function cancelRetry() {
    if (state.retryTimer) clearTimeout(state.retryTimer);
    if (state.countdownTimer) clearInterval(state.countdownTimer);
    state.retryTimer = null;
    state.countdownTimer = null;
  }

  function connect() {
    cancelRetry();
    const gen = ++state.gen;
    state.opened = false;
    setStatus(state.everConnected ? 'reconnecting' : 'connecting',
      state.everConnected ? 'reconnecting…' : 'connecting…');

    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (e) {
      showError('Could not open a connection: ' + (e && e.message ? e.message : e));
      scheduleReconnect(gen);
      return;
    }
    state.ws = sock;

    sock.onopen = () => {
      if (gen !== state.gen) return;
      state.opened = true;
      // The `welcome` frame flips the status to connected.
    };
    sock.onmessage = (ev) => {
      if (gen !== state.gen) return;
      if (typeof ev.data !== 'string') return;
      let f;
      try { f = JSON.parse(ev.data); } catch (_) { return; }
      onFrame(f);
    };
    sock.onerror = () => { /* onclose follows and does the work */ };
    sock.onclose = (ev) => {
      if (gen !== state.gen) return;
      state.ws = null;
      if (state.opened) onClosedAfterOpen(gen, ev);
      else onFailedBeforeOpen(gen);
    };
  }

  function onClosedAfterOpen(gen, ev) {
    const reason = CLOSE_REASONS[ev.code] || (ev.reason ? ev.reason : 'connection closed');
    failPending(ev.code === 1009 ? 'Message too big — not sent.'
      : 'Not confirmed: the connection dropped. It may not have been delivered.');
    appendSystem('Disconnected: ' + reason + (ev.code ? ' [' + ev.code + ']' : '') + '. Reconnecting…');
    scheduleReconnect(gen);
  }

  // A browser cannot see the HTTP status of a refused upgrade, so ask the
  // server the same question with a plain GET: it answers with the JSON error
  // it would have refused the handshake with, or 426 if it would accept.
  function onFailedBeforeOpen(gen) {
    const url = '/ws?room=' + encodeURIComponent(state.room) + '&user=' + encodeURIComponent(state.user);
    fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } })
      .then((res) => res.json().catch(() => ({})).then((body) => ({ status: res.status, body: body })))
      .then(({ status, body }) => {
        if (gen !== state.gen) return;
        const code = body && typeof body.code === 'string' ? body.code : '';
        const message = body && typeof body.message === 'string' ? body.message : '';
        if (FATAL_CODES.has(code)) {
          stopWithRefusal(code, message);
          return;
        }
        if (status === 426 || code === 'upgrade_required') {
          // The server would accept us: a transient failure. Keep trying.
          showError('Connection failed; retrying…', 'connect_failed');
        } else {
          const text = FRIENDLY[code] || message || ('Server answered ' + status);
          showError(text + ' Retrying…', code || 'http_' + status);
        }
        scheduleReconnect(gen);
      })
      .catch(() => {
        if (gen !== state.gen) return;
        showError('Cannot reach the server. Retrying…', 'unreachable');
        scheduleReconnect(gen);
      });
  }

  function stopWithRefusal(code, message) {
    cancelRetry();
    state.gen++;
    state.everConnected = false;
    setStatus('disconnected', 'disconnected');
    failPending('Not sent.');
    showView('join');
    showError(FRIENDLY[code] || message || code, code);
    const field = code === 'invalid_room' ? el.room : code === 'origin_not_allowed' ? null : el.name;
    if (field) {
      field.setAttribute('aria-invalid', 'true');
      field.focus();
      field.select();
    }
  }

  function scheduleReconnect(gen) {
    if (gen !== state.gen) return;
    cancelRetry();
    const delay = randomDelay(state.attempt);
    state.attempt++;
    state.retryAt = Date.now() + delay;
    state.retryTimer = setTimeout(() => {
      if (gen !== state.gen) return;
      state.retryTimer = null;
      connect();
    }, delay);
    const tick = () => {
      const left = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
      setStatus('reconnecting', left > 0 ? 'reconnecting in ' + left + 's' : 'reconnecting…');
    };
    tick();
    state.countdownTimer = setInterval(tick, 250);
  }

  function failPending(label) {
    for (const [, li] of state.pending) setMsgState(li, 'unconfirmed', '!', label, label);
    state.pending.clear();
    for (const [, e] of state.earlyEchoes) clearTimeout(e.timer);
    // Echoes that were waiting for an ack are real messages: show them.
    const held = Array.from(state.earlyEchoes.values()).map((e) => e.frame);
    state.earlyEchoes.clear();
    held.forEach((f) => { if (!state.byId.has(f.id)) showIncoming(f); });
  }

  function disconnect() {
    cancelRetry();
    state.gen++;
    const ws = state.ws;
    state.ws = null;
    if (ws) {
      try { ws.close(1000, 'leaving'); } catch (_) { /* ignore */ }
    }
  }

  // ---------------------------------------------------------------- actions
  function validate(user, room) {
    el.name.removeAttribute('aria-invalid');
    el.room.removeAttribute('aria-invalid');
    if (!USER_RE.test(user)) {
      el.name.setAttribute('aria-invalid', 'true');
      el.name.focus();
      return user === '' ? 'Please enter a name.'
        : 'Names are 1–32 characters: letters, digits, - or _ (no spaces).';
    }
    if (!ROOM_RE.test(room)) {
      el.room.setAttribute('aria-invalid', 'true');
      el.room.focus();
      return 'Rooms are 1–64 characters: letters, digits, - or _ (no spaces).';
    }
    return null;
  }

  function onJoin(ev) {
    ev.preventDefault();
    const user = el.name.value.trim();
    let room = el.room.value.trim().replace(/^#/, '');
    if (room === '') room = DEFAULT_ROOM;
    const problem = validate(user, room);
    if (problem) {
      showError(problem, 'invalid_input');
      return;
    }
    clearError();
    try {
      localStorage.setItem(LS_NAME, user);
      localStorage.setItem(LS_ROOM, room);
    } catch (_) { /* storage may be unavailable */ }

    if (room !== state.room || user !== state.user) resetMessages();
    state.user = user;
    state.room = room;
    state.attempt = 0;
    state.everConnected = false;
    el.roomTitle.textContent = '#' + room;
    updateTitle();
    showView('chat');
    connect();
    el.text.focus();
  }

  function resetMessages() {
    el.messages.textContent = '';
    state.pending.clear();
    state.byId.clear();
    for (const [, e] of state.earlyEchoes) clearTimeout(e.timer);
    state.earlyEchoes.clear();
    state.lastFrom = null;
    state.unread = 0;
  }

  function onLeave() {
    disconnect();
    failPending('Not sent.');
    state.everConnected = false;
    setStatus('disconnected', 'disconnected');
    clearError();
    resetMessages();
    state.room = '';
    updateTitle();
    showView('join');
    el.name.focus();
  }

  function onSend(ev) {
    if (ev) ev.preventDefault();
    const text = el.text.value;
    if (text.trim() === '') return;
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || el.status.dataset.state !== 'connected') {
      showError('Not connected — your message is kept; send it when the connection is back.', 'not_connected');
      return;
    }
    const ref = 'c' + (++state.refCounter);
    const li = buildMessage({ from: state.user, text: text, ts: Date.now(), own: true });
    li.dataset.ref = ref;
    state.pending.set(ref, li);
    try {
      ws.send(JSON.stringify({ type: 'message', text: text, ref: ref }));
    } catch (e) {
      state.pending.delete(ref);
      showError('Could not send: ' + (e && e.message ? e.message : e));
      return;
    }
    appendMessage(li, Date.now(), true);
    el.text.value = '';
    autoGrow();
    el.send.disabled = true;
    el.text.focus();
    clearError(); // a successful send supersedes any earlier notice
  }

  function autoGrow() {
    el.text.style.height = 'auto';
    el.text.style.height = Math.min(el.text.scrollHeight, 160) + 'px';
  }

  // ---------------------------------------------------------------- wiring
  el.joinForm.addEventListener('submit', onJoin);
  el.composer.addEventListener('submit', onSend);
  el.leave.addEventListener('click', onLeave);
  el.retry.addEventListener('click', () => { state.attempt = 0; connect(); });
  el.jump.addEventListener('click', scrollToBottom);
  // "Edit & resend" on a failed/unconfirmed message puts its text back in the composer.
  el.messages.addEventListener('click', (ev) => {
    const btn = ev.target instanceof Element ? ev.target.closest('.edit') : null;
    if (!btn) return;
    const li = btn.closest('.msg');
    if (!li) return;
    const text = li.querySelector('.text').textContent;
    el.text.value = el.text.value.trim() === '' ? text : el.text.value + '\n' + text;
    li.remove();
    state.lastFrom = null;
    autoGrow();
    el.send.disabled = el.status.dataset.state !== 'connected';
    el.text.focus();
  });
  el.messages.addEventListener('scroll', () => { if (isAtBottom()) el.jump.hidden = true; });

  el.text.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      onSend();
    }
  });
  el.text.addEventListener('input', () => {
    autoGrow();
    el.send.disabled = el.status.dataset.state !== 'connected' || el.text.value.trim() === '';
  });
  [el.name, el.room].forEach((input) => {
    input.addEventListener('input', () => {
      input.removeAttribute('aria-invalid');
      if (!el.error.hidden && el.joinView.hidden === false) clearError();
    });
  });

  document.addEventListener('visibilitychange', () => {
    if (!document.hidden) { state.unread = 0; updateTitle(); }
  });
  window.addEventListener('online', () => {
    if (state.retryTimer && state.room) { state.attempt = 0; connect(); }
  });

  // Prefill from ?room=&user= (shareable links) or the last values used.
  (function prefill() {
    let name = '';
    let room = '';
    try {
      name = localStorage.getItem(LS_NAME) || '';
      room = localStorage.getItem(LS_ROOM) || '';
    } catch (_) { /* ignore */ }
    const q = new URLSearchParams(location.search);
    if (q.get('room')) room = q.get('room');
    if (q.get('user')) name = q.get('user');
    el.name.value = name;
    el.room.value = room;
    showView('join');
    (name ? el.room : el.name).focus();
  })();
})();
