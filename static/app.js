// Warren chat page. Plain JS, no framework, no build step. The connection
// (transports, reconnecting, subscriptions, presence, acks) is warren-client
// from clients/js, which Warren serves at /warren-client.js; this file is the UI.
// SECURITY: every piece of user- or server-supplied text is inserted with
// textContent / createTextNode. Never use innerHTML here.
import { WarrenClient } from '/warren-client.js';

/** Messages of a room's history shown when joining it. */
const HISTORY = 50;
const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/;
const USER_RE = /^[A-Za-z0-9_-]{1,32}$/;
const DEFAULT_ROOM = 'lobby';

// An echo of our own message that arrives before its ack is held this long
// waiting for the ack; after that it is shown as an ordinary message.
const EARLY_ECHO_GRACE_MS = 5000;
// In "auto" mode, this many consecutive WebSocket failures before `open`
// (while the server says it would accept us) switch to Server-Sent Events.
const WS_FAILURES_BEFORE_SSE = 3;
// Rooms one page keeps (the server allows more per connection).
const MAX_ROOMS = 20;

const FRIENDLY = {
  too_many_sessions: 'That name is connected in too many tabs or devices already. Close one, or pick another name.',
  too_many_rooms: 'You are in as many rooms as a connection may be.',
  token_required: 'This server requires you to sign in: open the page with your ?token=.',
  invalid_token: 'Your sign-in token was not accepted.',
  token_expired: 'Your sign-in token has expired: get a fresh one and reload.',
  forbidden: 'You may not use that room.',
  rate_limited: 'Slow down: too many messages at once.',
  not_subscribed: 'You are not in that room.',
  invalid_user: 'That name is not allowed: use 1–32 letters, digits, - or _.',
  invalid_room: 'That room name is not allowed: use 1–64 letters, digits, - or _.',
  origin_not_allowed: 'This page’s origin is not allowed to connect to the server.',
  unavailable: 'The server is busy or unavailable right now.',
  message_too_large: 'Message too large — not sent.',
  sse_one_room: 'Joining several rooms needs a WebSocket connection.',
  sse_unsupported: 'This server does not offer Server-Sent Events. Choose “Auto” or “WebSocket”.',
};

const TRANSPORT_LABEL = { ws: 'WebSocket', sse: 'SSE' };

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
const LS_ROOMS = 'warren.rooms';
const LS_TRANSPORT = 'warren.transport';

const $ = (sel) => document.querySelector(sel);

const el = {
  joinView: $('#join-view'),
  chatView: $('#chat-view'),
  joinForm: $('#join-form'),
  name: $('#name'),
  room: $('#room'),
  transportSelect: $('#transport-select'),
  join: $('#join'),
  roomTitle: $('#room-title'),
  status: $('#status'),
  transport: $('#transport'),
  retry: $('#retry'),
  leave: $('#leave'),
  conversations: $('#conversations'),
  membersToggle: $('#members-toggle'),
  memberCount: $('#member-count'),
  membersPanel: $('#members-panel'),
  membersRoom: $('#members-room'),
  membersN: $('#members-n'),
  membersClose: $('#members-close'),
  members: $('#members'),
  backdrop: $('#drawer-backdrop'),
  messages: $('#messages'),
  jump: $('#jump'),
  composer: $('#composer'),
  text: $('#text'),
  send: $('#send'),
  error: $('#error'),
  addRoom: $('#add-room'),
  newRoom: $('#new-room'),
};

// ---------------------------------------------------------------- state
const state = {
  client: null,        // the WarrenClient of this join (null while on the join view)
  user: '',
  jwt: '',             // the application's sign-in token (?token=), if any
  room: '',            // the room whose members the panel shows (the last one viewed)
  rooms: [],           // rooms this page is in, in the order joined
  mode: 'auto',        // what the user picked: auto | ws | sse
  transport: 'ws',     // what is in use (or being tried): ws | sse
  countdownTimer: null,// ticks "reconnecting in Ns" while the client waits to retry
  retryAt: 0,
  refCounter: 0,
  pending: new Map(),    // ref -> {li, conv, via} own message awaiting ack
  byId: new Map(),       // message id -> element (everything shown)
  earlyEchoes: new Map(),// id -> {frame, timer} own echo seen before its ack
  convs: new Map(),      // '#room' | '@user' -> conversation
  active: '',            // key of the conversation on screen
  hiddenUnread: 0,       // messages in the active conversation while the tab was hidden
};

// ---------------------------------------------------------------- helpers
function connected() { return el.status.dataset.state === 'connected'; }

// `extra` is a detail narrow screens leave out (e.g. " as alice").
function setStatus(kind, text, extra) {
  el.status.dataset.state = kind;
  el.status.textContent = text;
  if (extra) {
    const more = document.createElement('span');
    more.className = 'status-extra';
    more.textContent = extra;
    el.status.appendChild(more);
  }
  el.retry.hidden = kind !== 'reconnecting' || !state.countdownTimer;
  el.chatView.dataset.state = kind;
  updateComposer();
}

function setTransport(t) {
  state.transport = t;
  el.transport.dataset.transport = t;
  el.transport.textContent = 'via ' + TRANSPORT_LABEL[t];
  el.transport.title = t === 'sse'
    ? 'Server-Sent Events for receiving, HTTP POST for sending'
    : 'One WebSocket for sending and receiving';
}

function updateComposer() {
  const conv = activeConv();
  const ok = connected();
  el.send.disabled = !ok || el.text.value.trim() === '';
  if (!ok) {
    el.text.placeholder = el.status.dataset.state === 'disconnected' ? 'Disconnected' : 'Waiting for connection…';
  } else if (conv && conv.kind === 'direct') {
    el.text.placeholder = conv.peer === state.user ? 'Note to yourself' : 'Message @' + conv.peer;
  } else if (conv) {
    el.text.placeholder = 'Message ' + conv.key;
  }
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
  if (!chat) setDrawer(false);
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

function avatar(name, extra) {
  const a = document.createElement('span');
  a.className = 'avatar ' + colorClass(name) + (extra ? ' ' + extra : '');
  a.setAttribute('aria-hidden', 'true');
  a.textContent = name.charAt(0).toUpperCase();
  return a;
}

function totalUnread() {
  let n = state.hiddenUnread;
  for (const c of state.convs.values()) if (c.key !== state.active) n += c.unread;
  return n;
}

function updateTitle() {
  const conv = activeConv();
  const where = conv ? conv.key : (state.room ? '#' + state.room : '');
  const base = where ? where + ' — Warren' : 'Warren';
  const n = totalUnread();
  document.title = n > 0 ? '(' + n + ') ' + base : base;
}

// ---------------------------------------------------------------- conversations
// A conversation is the room ('#lobby') or a direct one with a user ('@bob').
// Each has its own message list; only the active one is shown.
function activeConv() { return state.convs.get(state.active) || null; }

function roomKey(room) { return '#' + (room === undefined ? state.room : room); }

// Who is in a room, as the client keeps it from `subscribed` and `presence`.
function membersOf(room) {
  return state.client ? state.client.members(room) : new Set();
}

function ensureConv(key) {
  let conv = state.convs.get(key);
  if (conv) return conv;
  const direct = key.charAt(0) === '@';
  conv = {
    key: key,
    kind: direct ? 'direct' : 'room',
    peer: direct ? key.slice(1) : '',
    unread: 0,
    lastFrom: null,
    lastTs: 0,
    stick: true,
    scrollTop: 0,
    draft: '',
    list: document.createElement('ol'),
    button: document.createElement('button'),
    badge: document.createElement('span'),
  };
  conv.list.className = 'messages';
  conv.list.dataset.conv = key;
  conv.list.dataset.kind = conv.kind;
  conv.list.hidden = true;
  conv.list.setAttribute('aria-live', 'polite');
  conv.list.setAttribute('aria-label', direct ? 'Direct messages with ' + conv.peer : 'Messages in ' + key);
  conv.list.addEventListener('scroll', () => {
    if (conv.key === state.active && isAtBottom(conv)) el.jump.hidden = true;
  });
  el.messages.appendChild(conv.list);

  const b = conv.button;
  b.type = 'button';
  b.className = 'conv';
  b.dataset.conv = key;
  b.dataset.kind = conv.kind;
  if (direct) {
    b.appendChild(avatar(conv.peer, 'avatar-sm'));
  } else {
    const hash = document.createElement('span');
    hash.className = 'avatar avatar-sm room-icon';
    hash.setAttribute('aria-hidden', 'true');
    hash.textContent = '#';
    b.appendChild(hash);
  }
  const label = document.createElement('span');
  label.className = 'conv-name';
  label.textContent = direct ? conv.peer : key.slice(1);
  b.appendChild(label);
  if (direct && conv.peer === state.user) {
    const you = document.createElement('span');
    you.className = 'you';
    you.textContent = 'you';
    b.appendChild(you);
  }
  if (direct) {
    const dot = document.createElement('span');
    dot.className = 'presence-dot';
    b.appendChild(dot);
  }
  conv.badge.className = 'badge';
  conv.badge.hidden = true;
  b.appendChild(conv.badge);
  b.addEventListener('click', () => switchConv(key));
  const li = document.createElement('li');
  li.appendChild(b);
  if (!direct) {
    const leave = document.createElement('button');
    leave.type = 'button';
    leave.className = 'conv-leave';
    leave.dataset.room = key.slice(1);
    leave.textContent = '✕';
    leave.title = 'Leave ' + key;
    leave.setAttribute('aria-label', 'Leave ' + key);
    li.appendChild(leave);
  }
  conv.item = li;
  el.conversations.appendChild(li);

  state.convs.set(key, conv);
  el.chatView.dataset.convs = String(state.convs.size);
  updatePresenceDots();
  updateConvLabel(conv);
  return conv;
}

function updateConvLabel(conv) {
  const who = conv.kind === 'direct' ? 'Direct messages with ' + conv.peer : 'Room ' + conv.key;
  conv.button.setAttribute('aria-label', conv.unread > 0 ? who + ', ' + conv.unread + ' unread' : who);
  conv.badge.textContent = conv.unread > 99 ? '99+' : String(conv.unread);
  conv.badge.hidden = conv.unread === 0;
  conv.button.classList.toggle('has-unread', conv.unread > 0);
}

function switchConv(key) {
  const next = ensureConv(key);
  const prev = activeConv();
  if (prev && prev !== next) {
    prev.stick = isAtBottom(prev);
    prev.scrollTop = prev.list.scrollTop;
    prev.draft = el.text.value;
    prev.list.hidden = true;
    prev.button.removeAttribute('aria-current');
    prev.button.classList.remove('active');
  }
  state.active = key;
  next.list.hidden = false;
  next.button.setAttribute('aria-current', 'true');
  next.button.classList.add('active');
  next.unread = 0;
  updateConvLabel(next);
  if (prev !== next) {
    el.text.value = next.draft;
    autoGrow();
  }
  el.chatView.dataset.kind = next.kind;
  el.roomTitle.textContent = next.kind === 'direct' ? '@' + next.peer : next.key;
  if (next.kind === 'room' && next.key.slice(1) !== state.room) {
    state.room = next.key.slice(1);
    renderMembers();
  }
  if (next.stick) scrollToBottom(); else { next.list.scrollTop = next.scrollTop; el.jump.hidden = true; }
  if (next.button.scrollIntoView) next.button.scrollIntoView({ block: 'nearest', inline: 'nearest' });
  updateComposer();
  updateTitle();
}

function openDirect(user) {
  if (!USER_RE.test(user)) return;
  switchConv('@' + user);
  setDrawer(false, false);
  el.text.focus();
}

function resetConversations() {
  for (const [, e] of state.earlyEchoes) clearTimeout(e.timer);
  state.earlyEchoes.clear();
  state.pending.clear();
  state.byId.clear();
  state.convs.clear();
  state.active = '';
  state.hiddenUnread = 0;
  el.messages.textContent = '';
  el.conversations.textContent = '';
  el.chatView.dataset.convs = '0';
  renderMembers();
}

// Forget a room's conversation (after leaving it).
function dropConv(key) {
  const conv = state.convs.get(key);
  if (!conv) return;
  conv.list.remove();
  if (conv.item) conv.item.remove();
  state.convs.delete(key);
  el.chatView.dataset.convs = String(state.convs.size);
  if (state.active === key) {
    state.active = '';
    const next = state.rooms.length ? roomKey(state.rooms[0]) : (state.convs.keys().next().value || '');
    if (next) switchConv(next);
  }
  updateTitle();
}

// ---------------------------------------------------------------- members
function sortedMembers(members) {
  const me = state.user;
  return Array.from(members).sort((a, b) => {
    if (a === me) return -1;
    if (b === me) return 1;
    const x = a.toLowerCase();
    const y = b.toLowerCase();
    return x < y ? -1 : x > y ? 1 : (a < b ? -1 : a > b ? 1 : 0);
  });
}

function buildMember(name) {
  const li = document.createElement('li');
  const b = document.createElement('button');
  b.type = 'button';
  b.className = 'member';
  b.dataset.user = name;
  b.appendChild(avatar(name));
  const n = document.createElement('span');
  n.className = 'member-name';
  n.textContent = name;
  b.appendChild(n);
  if (name === state.user) {
    const you = document.createElement('span');
    you.className = 'you';
    you.textContent = 'you';
    b.appendChild(you);
    b.title = 'Send yourself a note';
  } else {
    b.title = 'Send ' + name + ' a direct message';
  }
  if (name !== state.user) {
    const go = document.createElement('span');
    go.className = 'dm-hint';
    go.setAttribute('aria-hidden', 'true');
    go.textContent = 'DM';
    b.appendChild(go);
  }
  li.appendChild(b);
  return li;
}

// Re-renders #members as a keyed list: existing rows are kept (and keep focus).
function renderMembers() {
  const members = membersOf(state.room);
  const have = new Map();
  for (const li of Array.from(el.members.children)) {
    const b = li.querySelector('.member');
    const name = b ? b.dataset.user : '';
    if (!name || !members.has(name) || have.has(name)) li.remove();
    else have.set(name, li);
  }
  let prev = null;
  for (const name of sortedMembers(members)) {
    const li = have.get(name) || buildMember(name);
    const expected = prev ? prev.nextSibling : el.members.firstChild;
    if (li !== expected) el.members.insertBefore(li, expected);
    prev = li;
  }
  const n = String(members.size);
  el.memberCount.textContent = n;
  el.membersN.textContent = n;
  el.membersRoom.textContent = '#' + state.room;
  el.membersToggle.setAttribute('aria-label', 'Show members (' + n + ' in #' + state.room + ')');
  updatePresenceDots();
}

function updatePresenceDots() {
  for (const c of state.convs.values()) {
    if (c.kind !== 'direct') continue;
    const where = state.rooms.filter((r) => membersOf(r).has(c.peer));
    c.button.dataset.online = where.length ? 'true' : 'false';
    c.button.title = where.length ? c.peer + ' is in #' + where.join(', #') : c.peer + ' is in none of your rooms';
  }
}

// The client applied a `presence` frame: `joins` and `leaves` are what
// changed. Say so in the room, and in DMs with the people concerned.
function onPresence(p) {
  if (state.rooms.indexOf(p.room) < 0) return;
  const joined = p.joins.filter((n) => n !== state.user);
  const left = p.leaves.filter((n) => n !== state.user);
  if (p.room === state.room) renderMembers();
  updatePresenceDots();
  const room = state.convs.get(roomKey(p.room));
  if (!room) return;
  if (joined.length) appendSystem(room, listNames(joined) + ' joined');
  if (left.length) appendSystem(room, listNames(left) + ' left');
  for (const n of left) {
    const dm = state.convs.get('@' + n);
    if (dm && dm.list.children.length) appendSystem(dm, n + ' left #' + p.room);
  }
  for (const n of joined) {
    const dm = state.convs.get('@' + n);
    if (dm && dm.list.children.length) appendSystem(dm, n + ' joined #' + p.room);
  }
}

function listNames(names) {
  if (names.length <= 3) return names.join(', ');
  return names.slice(0, 3).join(', ') + ' and ' + (names.length - 3) + ' more';
}

// Phone/tablet: the member list is a drawer.
function setDrawer(open, restoreFocus) {
  const was = el.chatView.classList.contains('drawer-open');
  el.chatView.classList.toggle('drawer-open', open);
  el.membersToggle.setAttribute('aria-expanded', open ? 'true' : 'false');
  el.backdrop.hidden = !open;
  if (open && !was) {
    const first = el.members.querySelector('.member');
    (first || el.membersClose).focus({ preventScroll: true });
  } else if (!open && was && restoreFocus !== false) {
    el.membersToggle.focus({ preventScroll: true });
  }
}

// ---------------------------------------------------------------- rendering
function isAtBottom(conv) {
  const m = conv.list;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
}

function scrollToBottom() {
  const conv = activeConv();
  if (conv) {
    conv.list.scrollTop = conv.list.scrollHeight;
    conv.stick = true;
  }
  el.jump.hidden = true;
}

// Builds one message element. Every text goes through textContent.
function buildMessage(opts) {
  const li = document.createElement('li');
  li.className = 'msg';
  li.dataset.from = opts.from;
  if (opts.id) li.dataset.id = opts.id;
  if (opts.own) li.classList.add('own');
  if (opts.direct) {
    li.classList.add('direct');
    li.dataset.to = opts.to;
  }

  const meta = document.createElement('div');
  meta.className = 'meta';

  const from = document.createElement('span');
  from.className = 'from ' + colorClass(opts.from);
  from.textContent = opts.from;
  meta.appendChild(from);

  if (opts.direct) {
    const tag = document.createElement('span');
    tag.className = 'tag';
    tag.textContent = 'direct';
    tag.title = opts.own ? 'Direct message to ' + opts.to : 'Direct message to you';
    meta.appendChild(tag);
  }

  const time = document.createElement('time');
  time.className = 'time';
  time.textContent = formatTime(opts.ts);
  const date = new Date(typeof opts.ts === 'number' ? opts.ts : Date.now());
  time.dateTime = date.toISOString();
  time.title = date.toLocaleString();
  meta.appendChild(time);

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

function appendMessage(conv, li, ts, forceScroll) {
  const isActive = conv.key === state.active;
  const stick = isActive && (forceScroll || isAtBottom(conv));
  // Group consecutive messages from the same sender within 5 minutes.
  const from = li.dataset.from;
  const t = typeof ts === 'number' ? ts : Date.now();
  if (conv.lastFrom === from && t - conv.lastTs < 5 * 60 * 1000) li.classList.add('cont');
  conv.lastFrom = from;
  conv.lastTs = t;

  if (isActive) {
    // Only messages that arrive on screen animate (not on every switch).
    li.classList.add('fresh');
    li.addEventListener('animationend', () => li.classList.remove('fresh'), { once: true });
  }
  conv.list.appendChild(li);
  if (stick) scrollToBottom();
  else if (isActive) el.jump.hidden = false;

  if (!li.classList.contains('own')) {
    if (!isActive) {
      conv.unread++;
      updateConvLabel(conv);
    } else if (document.hidden) {
      state.hiddenUnread++;
    }
    updateTitle();
  }
}

function appendSystem(conv, text) {
  const stick = conv.key === state.active && isAtBottom(conv);
  const li = document.createElement('li');
  li.className = 'sys';
  li.textContent = text;
  conv.list.appendChild(li);
  conv.lastFrom = null;
  if (stick) scrollToBottom();
}

// Our queue on the server overflowed (this tab fell behind): say so where the
// messages were lost, in order with the others.
function onGap({ room, missed }) {
  const text = missed + (missed === 1 ? ' message' : ' messages') + ' missed'
    + (room ? '' : ' among direct messages') + ': this tab fell behind.';
  if (room) appendSystem(ensureConv(roomKey(room)), text);
  else appendSystemRoom(text);
}

// A notice about the connection: shown in the room on screen (or the first).
function appendSystemRoom(text) {
  const conv = activeConv();
  if (conv) { appendSystem(conv, text); return; }
  const room = state.rooms[0] || state.room;
  if (room) appendSystem(ensureConv(roomKey(room)), text);
}

// label: short marker in the meta row; note: optional explanation below the
// text, shown as `.msg-error[data-code]` for failures.
function setMsgState(li, cls, label, title, note, code) {
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
      n.className = 'note msg-error';
      li.appendChild(n);
    }
    n.dataset.code = code || cls || 'error';
    n.textContent = '';
    const words = document.createElement('span');
    words.textContent = note;
    n.appendChild(words);
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

// The conversation an incoming frame belongs to.
function convFor(f) {
  if (f.type === 'direct') {
    const peer = f.from === state.user ? f.to : f.from;
    return ensureConv('@' + peer);
  }
  return ensureConv(roomKey(f.room));
}

function showIncoming(f) {
  const own = f.from === state.user;
  const direct = f.type === 'direct';
  const conv = convFor(f);
  const li = buildMessage({ id: f.id, from: f.from, to: f.to, text: f.text, ts: f.ts, own: own, direct: direct });
  if (own) setMsgState(li, 'delivered', '✓', 'Delivered');
  state.byId.set(f.id, li);
  appendMessage(conv, li, f.ts, false);
}

// ---------------------------------------------------------------- client events
function onConnecting(c) {
  cancelCountdown();
  setTransport(c.transport);
  setStatus(c.reconnect ? 'reconnecting' : 'connecting', c.reconnect ? 'reconnecting…' : 'connecting…');
}

function onConnected(c) {
  cancelCountdown();
  if (typeof c.user === 'string' && c.user) state.user = c.user;
  setTransport(c.transport);
  if (!state.active && state.rooms.length) switchConv(roomKey(state.rooms[0]));
  const conv = activeConv();
  if (conv) el.roomTitle.textContent = conv.kind === 'direct' ? '@' + conv.peer : conv.key;
  updateTitle();
  let detail = 'connected as ' + state.user + ' via ' +
    (c.transport === 'sse' ? 'Server-Sent Events' : 'WebSocket');
  if (typeof c.node === 'string' && c.node) detail += ' (node ' + c.node + ')';
  setStatus('connected', 'connected', ' as ' + state.user);
  el.status.title = detail;
  clearError();
  appendSystemRoom((c.reconnected ? 'Reconnected' : 'Connected') + ' as ' + state.user +
    (c.transport === 'sse' ? ' (via Server-Sent Events)' : ''));
}

function onSubscribed(s) {
  if (state.rooms.indexOf(s.room) < 0) { state.rooms.push(s.room); saveRooms(); }
  const conv = ensureConv(roomKey(s.room));
  if (s.room === state.room) renderMembers();
  updatePresenceDots();
  if (!state.active) switchConv(conv.key);
  appendSystem(conv, 'In #' + s.room + ' as ' + state.user);
}

// After a lost connection the client resumed its session: what was sent
// meanwhile follows (each message shown once: the page keeps ids). When the
// server could not keep it, the client asked each room's history since the
// last message shown.
function onResumed(r) {
  appendSystemRoom(r.recovered
    ? 'Back, with everything sent while you were away.'
    : 'Back. The server could not keep your session: messages sent while you were away are shown as far as its history goes.');
}

// A room the server would not let us into (now, or again after a reconnect).
function onSubscribeError(s) {
  const code = s.error.code;
  const i = state.rooms.indexOf(s.room);
  if (i >= 0) { state.rooms.splice(i, 1); saveRooms(); }
  dropConv(roomKey(s.room));
  updatePresenceDots();
  showError('Could not join #' + s.room + ': ' + (FRIENDLY[code] || s.error.message), code);
}

// An error the server sent about nothing we are waiting for.
function onServerError(e) {
  const code = e.code;
  const msg = e.message || FRIENDLY[code] || code;
  showError(FRIENDLY[code] && code !== 'message_too_large' ? FRIENDLY[code] + ' (' + msg + ')' : msg, code);
}

// The client lost its connection (or could not open one) and will retry.
function onDisconnected(d) {
  if (d.opened) {
    const reason = d.transport === 'sse' ? 'the event stream ended'
      : CLOSE_REASONS[d.code] || (d.reason ? d.reason : 'connection closed');
    const code = d.transport === 'ws' && d.code ? ' [' + d.code + ']' : '';
    appendSystemRoom('Disconnected: ' + reason + code + '. Reconnecting…');
  } else if (state.client.transport === d.transport) {
    // (After a change of transport the next try is on the other one: no notice.)
    const e = d.error;
    const code = e ? e.code : 'connect_failed';
    if (code === 'connect_failed') {
      showError(d.transport === 'sse' ? 'The event stream failed; retrying…' : 'Connection failed; retrying…', code);
    } else if (code === 'unreachable') {
      showError('Cannot reach the server. Retrying…', code);
    } else {
      showError((FRIENDLY[code] || e.message || code) + ' Retrying…', code);
    }
  }
  startCountdown(d.delayMs);
}

function onTransport(t) {
  setTransport(t.transport);
  if (t.transport === 'sse') {
    clearError();
    appendSystemRoom('WebSocket could not connect ' + WS_FAILURES_BEFORE_SSE +
      ' times — switching to Server-Sent Events.');
  } else {
    appendSystemRoom('This server does not offer Server-Sent Events; staying on WebSocket.');
  }
}

// The client stopped for good: a refusal only the user can fix.
function onClosed(c) {
  if (c.error) stopWithRefusal(c.error.code, c.error.message);
}

// ---------------------------------------------------------------- connection
function connect() {
  closeClient();
  const client = new WarrenClient({
    url: location.origin,
    user: state.jwt ? undefined : state.user,
    token: state.jwt || undefined,
    transport: state.mode === 'ws' ? 'websocket' : state.mode,
    wsFailuresBeforeSse: WS_FAILURES_BEFORE_SSE,
  });
  state.client = client;
  // Events of a client this page has let go of change nothing.
  const on = (name, fn) => client.on(name, (detail) => { if (state.client === client) fn(detail); });
  on('connecting', onConnecting);
  on('connected', onConnected);
  on('disconnected', onDisconnected);
  on('closed', onClosed);
  on('transport', onTransport);
  on('subscribed', onSubscribed);
  on('subscribeError', onSubscribeError);
  on('unsubscribed', updatePresenceDots);
  on('presence', onPresence);
  on('message', onChat);
  on('direct', onChat);
  on('error', onServerError);
  on('tokenExpiring', () => appendSystemRoom('Your sign-in expires soon: get a fresh token to stay connected.'));
  // Outcomes arrive as the events above; the promises are not needed here.
  on('resumed', onResumed);
  on('gap', onGap);
  for (const room of state.rooms) client.subscribe(room, { history: HISTORY }).catch(() => {});
  client.connect().catch(() => {});
}

function closeClient() {
  cancelCountdown();
  const client = state.client;
  state.client = null;
  if (client) client.close();
}

function stopWithRefusal(code, message) {
  closeClient();
  setStatus('disconnected', 'disconnected');
  failPending('Not sent.');
  showView('join');
  showError(FRIENDLY[code] || message || code, code);
  const field = code === 'invalid_room' ? el.room
    : code === 'sse_unsupported' ? el.transportSelect
      : code === 'origin_not_allowed' ? null : el.name;
  if (field) {
    if (field !== el.transportSelect) field.setAttribute('aria-invalid', 'true');
    field.focus();
    if (field.select) field.select();
  }
}

// "reconnecting in Ns" until the client tries again.
function startCountdown(delayMs) {
  cancelCountdown();
  state.retryAt = Date.now() + delayMs;
  const tick = () => {
    const left = Math.max(0, Math.ceil((state.retryAt - Date.now()) / 1000));
    setStatus('reconnecting', left > 0 ? 'reconnecting in ' + left + 's' : 'reconnecting…');
  };
  state.countdownTimer = setInterval(tick, 250);
  tick();
}

function cancelCountdown() {
  if (state.countdownTimer) clearInterval(state.countdownTimer);
  state.countdownTimer = null;
}

// Marks every message still waiting for an answer as unconfirmed.
function failPending(label) {
  for (const [ref, p] of state.pending) {
    setMsgState(p.li, 'unconfirmed', '!', label, label, 'not_confirmed');
    state.pending.delete(ref);
  }
  releaseEarlyEchoes();
}

// Echoes that were waiting for an ack that will not come are real messages:
// show them, once nothing is pending any more.
function releaseEarlyEchoes() {
  if (state.pending.size > 0) return;
  for (const [, e] of state.earlyEchoes) clearTimeout(e.timer);
  const held = Array.from(state.earlyEchoes.values()).map((e) => e.frame);
  state.earlyEchoes.clear();
  held.forEach((f) => { if (!state.byId.has(f.id)) showIncoming(f); });
}

function saveRooms() {
  try { localStorage.setItem(LS_ROOMS, JSON.stringify(state.rooms)); } catch (_) { /* ignore */ }
}

function savedRooms() {
  try {
    const list = JSON.parse(localStorage.getItem(LS_ROOMS) || '[]');
    return Array.isArray(list) ? list.filter((r) => typeof r === 'string' && ROOM_RE.test(r)) : [];
  } catch (_) { return []; }
}

// Join another room from the sidebar (WebSocket only: an event stream
// carries one room).
function onAddRoom(ev) {
  ev.preventDefault();
  const room = el.newRoom.value.trim().replace(/^#/, '');
  el.newRoom.removeAttribute('aria-invalid');
  if (!ROOM_RE.test(room)) {
    el.newRoom.setAttribute('aria-invalid', 'true');
    showError('Rooms are 1–64 characters: letters, digits, - or _ (no spaces).', 'invalid_input');
    return;
  }
  el.newRoom.value = '';
  if (state.rooms.indexOf(room) >= 0) { switchConv(roomKey(room)); return; }
  if (state.client && state.client.transport === 'sse') {
    showError('Joining several rooms needs a WebSocket connection.', 'sse_one_room');
    return;
  }
  if (state.rooms.length >= MAX_ROOMS) {
    showError(FRIENDLY.too_many_rooms, 'too_many_rooms');
    return;
  }
  state.rooms.push(room);
  saveRooms();
  switchConv(roomKey(room));
  if (state.client) state.client.subscribe(room, { history: HISTORY }).catch(() => {}); // answered by events
}

function leaveRoom(room) {
  const i = state.rooms.indexOf(room);
  if (i < 0) return;
  if (state.rooms.length === 1) { onLeave(); return; }
  state.rooms.splice(i, 1);
  saveRooms();
  if (state.client) state.client.unsubscribe(room).catch(() => {});
  dropConv(roomKey(room));
  updatePresenceDots();
}

function onChat(f) {
  if (typeof f.id === 'number') f.id = String(f.id);
  if (typeof f.id !== 'string' || typeof f.text !== 'string' || typeof f.from !== 'string') return;
  if (f.type === 'message' && (typeof f.room !== 'string' || state.rooms.indexOf(f.room) < 0)) return;
  if (f.type === 'direct') {
    if (typeof f.to !== 'string') f.to = state.user;
    if (f.from !== state.user && f.to !== state.user) return; // not ours
    if (!USER_RE.test(f.from) || !USER_RE.test(f.to)) return;
  }
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

// The server took our message `ref` (the ack, or over SSE the POST's 202).
function onAck(ref, id) {
  const p = state.pending.get(ref);
  if (!p) return; // left, or already settled
  state.pending.delete(ref);
  const li = p.li;
  if (typeof id === 'string' && id) {
    li.dataset.id = id;
    state.byId.set(id, li);
    const early = state.earlyEchoes.get(id);
    if (early) {
      clearTimeout(early.timer);
      state.earlyEchoes.delete(id);
      // Prefer the server's timestamp for our own message.
      if (typeof early.frame.ts === 'number') {
        const t = li.querySelector('.time');
        if (t) t.textContent = formatTime(early.frame.ts);
      }
    }
  }
  setMsgState(li, 'delivered', '✓', 'Delivered');
}

// Our message `ref` was refused, or the connection ended before its answer.
function onSendFailed(ref, e) {
  const p = state.pending.get(ref);
  if (!p) return;
  state.pending.delete(ref);
  const code = e && e.code ? e.code : 'error';
  if (code === 'connection_lost' || code === 'closed') {
    const label = code === 'closed' ? 'Not sent.'
      : e.closeCode === 1009 ? 'Message too big — not sent.'
        : p.via === 'sse' ? 'Not confirmed: the request failed. It may not have been delivered.'
          : 'Not confirmed: the connection dropped. It may not have been delivered.';
    setMsgState(p.li, 'unconfirmed', '!', label, label, 'not_confirmed');
  } else {
    const msg = e.message || FRIENDLY[code] || code;
    let note = FRIENDLY[code] || msg;
    if (code === 'user_not_found' && p.conv.kind === 'direct') {
      note = p.conv.peer + ' is offline — not delivered.';
    } else if (code === 'invalid_user' && p.conv.kind === 'direct') {
      note = '“' + p.conv.peer + '” is not a valid user name — not sent.';
    } else if (code === 'unavailable') {
      note = 'The server could not deliver this right now — not sent.';
    } else if (code === 'not_connected') {
      note = 'Not connected — not sent.';
    }
    setMsgState(p.li, 'failed', 'not sent', msg, note, code);
    p.li.dataset.error = code;
  }
  releaseEarlyEchoes();
}

// ---------------------------------------------------------------- sending
function onSend(ev) {
  if (ev) ev.preventDefault();
  const text = el.text.value;
  if (text.trim() === '') return;
  const conv = activeConv();
  const client = state.client;
  if (!conv || !client || !connected()) {
    showError('Not connected — your message is kept; send it when the connection is back.', 'not_connected');
    return;
  }
  const via = client.transport;
  const ref = 'c' + (++state.refCounter);
  const direct = conv.kind === 'direct';
  const li = buildMessage({ from: state.user, to: conv.peer, text: text, ts: Date.now(), own: true, direct: direct });
  li.dataset.ref = ref;
  state.pending.set(ref, { li: li, conv: conv, via: via });
  const sent = direct ? client.sendDirect(conv.peer, text) : client.send(conv.key.slice(1), text);
  sent.then(({ id }) => onAck(ref, id), (e) => onSendFailed(ref, e));
  appendMessage(conv, li, Date.now(), true);
  el.text.value = '';
  conv.draft = '';
  autoGrow();
  el.send.disabled = true;
  el.text.focus();
  clearError(); // a successful send supersedes any earlier notice
}

function autoGrow() {
  if (el.text.value === '') { el.text.style.height = ''; return; }
  el.text.style.height = 'auto';
  el.text.style.height = Math.min(el.text.scrollHeight, 160) + 'px';
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

function pickedMode() {
  const v = el.transportSelect.value;
  return v === 'ws' || v === 'sse' ? v : 'auto';
}

function onJoin(ev) {
  ev.preventDefault();
  // Signed in with ?token=, the server names us: the name field may stay empty.
  const user = el.name.value.trim() || (state.jwt ? 'signed-in' : '');
  let room = el.room.value.trim().replace(/^#/, '');
  if (room === '') room = DEFAULT_ROOM;
  const problem = validate(user, room);
  if (problem) {
    showError(problem, 'invalid_input');
    return;
  }
  clearError();
  const mode = pickedMode();
  try {
    if (!state.jwt) localStorage.setItem(LS_NAME, user);
    localStorage.setItem(LS_ROOM, room);
    localStorage.setItem(LS_TRANSPORT, mode);
  } catch (_) { /* storage may be unavailable */ }

  if (user !== state.user || state.rooms.indexOf(room) < 0) resetConversations();
  state.user = user;
  // The room from the form first, then the rooms this browser was in.
  state.rooms = [room].concat(savedRooms().filter((r) => r !== room)).slice(0, MAX_ROOMS);
  if (mode === 'sse') state.rooms = [room];
  saveRooms();
  state.room = room;
  state.mode = mode;
  setTransport(mode === 'sse' ? 'sse' : 'ws');
  for (const r of state.rooms) ensureConv(roomKey(r));
  switchConv(roomKey(room));
  renderMembers();
  showView('chat');
  connect();
  el.text.focus();
}

function onLeave() {
  closeClient();
  failPending('Not sent.');
  setStatus('disconnected', 'disconnected');
  clearError();
  resetConversations();
  state.room = '';
  state.rooms = [];
  saveRooms();
  updateTitle();
  showView('join');
  el.name.focus();
}

// ---------------------------------------------------------------- wiring
el.joinForm.addEventListener('submit', onJoin);
el.addRoom.addEventListener('submit', onAddRoom);
el.conversations.addEventListener('click', (ev) => {
  const b = ev.target instanceof Element ? ev.target.closest('.conv-leave') : null;
  if (b && b.dataset.room) leaveRoom(b.dataset.room);
});
el.composer.addEventListener('submit', onSend);
el.leave.addEventListener('click', onLeave);
el.retry.addEventListener('click', () => { if (state.client) state.client.reconnectNow(); });
el.jump.addEventListener('click', scrollToBottom);
el.membersToggle.addEventListener('click', () => {
  setDrawer(!el.chatView.classList.contains('drawer-open'));
});
el.membersClose.addEventListener('click', () => setDrawer(false));
el.backdrop.addEventListener('click', () => setDrawer(false));
el.members.addEventListener('click', (ev) => {
  const b = ev.target instanceof Element ? ev.target.closest('.member') : null;
  if (b && b.dataset.user) openDirect(b.dataset.user);
});
document.addEventListener('keydown', (ev) => {
  if (ev.key === 'Escape' && el.chatView.classList.contains('drawer-open')) {
    ev.preventDefault();
    setDrawer(false);
  }
});
// "Edit & resend" on a failed/unconfirmed message puts its text back in the composer.
el.messages.addEventListener('click', (ev) => {
  const btn = ev.target instanceof Element ? ev.target.closest('.edit') : null;
  if (!btn) return;
  const li = btn.closest('.msg');
  if (!li) return;
  const text = li.querySelector('.text').textContent;
  el.text.value = el.text.value.trim() === '' ? text : el.text.value + '\n' + text;
  li.remove();
  const conv = activeConv();
  if (conv) conv.lastFrom = null;
  autoGrow();
  updateComposer();
  el.text.focus();
});

el.text.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    onSend();
  }
});
el.text.addEventListener('input', () => {
  autoGrow();
  updateComposer();
});
[el.name, el.room].forEach((input) => {
  input.addEventListener('input', () => {
    input.removeAttribute('aria-invalid');
    if (!el.error.hidden && el.joinView.hidden === false) clearError();
  });
});
el.transportSelect.addEventListener('change', () => {
  if (!el.error.hidden && el.error.dataset.code === 'sse_unsupported') clearError();
});

document.addEventListener('visibilitychange', () => {
  if (!document.hidden) {
    state.hiddenUnread = 0;
    updateTitle();
  }
});
window.addEventListener('online', () => {
  if (state.client) state.client.reconnectNow(); // only while waiting to retry
});

// Prefill from ?room=&user=&transport= (shareable links) or the last values used.
(function prefill() {
  let name = '';
  let room = '';
  let transport = '';
  try {
    name = localStorage.getItem(LS_NAME) || '';
    room = localStorage.getItem(LS_ROOM) || '';
    transport = localStorage.getItem(LS_TRANSPORT) || '';
  } catch (_) { /* ignore */ }
  const q = new URLSearchParams(location.search);
  if (q.get('room')) room = q.get('room');
  if (q.get('user')) name = q.get('user');
  if (q.get('transport')) transport = q.get('transport');
  if (q.get('token')) {
    // The application signed us in: the server takes our name from the token.
    state.jwt = q.get('token');
    name = '';
    el.name.placeholder = 'from your sign-in';
  }
  el.name.value = name;
  el.room.value = room;
  el.transportSelect.value = transport === 'ws' || transport === 'sse' ? transport : 'auto';
  setTransport('ws');
  showView('join');
  (name ? el.room : el.name).focus();
})();
