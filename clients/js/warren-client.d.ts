// Types of warren-client.js (hand-written; keep them true as the code moves).

/** Server error codes (docs/PROTOCOL.md, "Error codes") and the client's own. */
export type WarrenErrorCode =
  | 'invalid_room' | 'invalid_user' | 'origin_not_allowed' | 'token_required' | 'invalid_token'
  | 'token_expired' | 'forbidden' | 'rate_limited' | 'user_not_found' | 'too_many_sessions'
  | 'too_many_rooms' | 'not_subscribed' | 'message_too_large' | 'unavailable' | 'invalid_json'
  | 'unknown_type' | 'invalid_message' | 'unsupported_frame' | 'upgrade_required'
  // the client's own
  | 'not_connected' | 'connection_lost' | 'closed' | 'closed_by_server' | 'unreachable'
  | 'connect_failed' | 'unsubscribed' | 'token_unavailable' | 'sse_one_room' | 'sse_needs_room'
  | 'sse_unsupported' | 'websocket_unsupported'
  | (string & {});

/** Every failure the client reports. */
export class WarrenError extends Error {
  readonly name: 'WarrenError';
  readonly code: WarrenErrorCode;
  /** The `ref` of the refused frame, when the server echoed it. */
  readonly ref?: string;
  /** On `rate_limited`: how long to wait before sending again. */
  readonly retryAfterMs?: number;
  /** The HTTP status, for a refused handshake, stream or POST. */
  readonly status?: number;
  /** The WebSocket close code, when a close caused the failure. */
  readonly closeCode?: number;
  readonly closeReason?: string;
  /** The server's `error` frame or JSON error body, as received. */
  readonly frame?: Record<string, unknown>;
  constructor(code: string, message?: string, fields?: Record<string, unknown>);
}

/** The wait before reconnect attempt `attempt`: random in [0, min(cap, base * 2^attempt)). */
export function backoffDelay(attempt: number, baseMs: number, capMs: number, random?: () => number): number;

export type TransportKind = 'ws' | 'sse';
export type ClientState = 'idle' | 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface WarrenClientOptions {
  /** The server, `http(s)://host[:port][/path]` (or `ws(s)://`). Default in a browser: the page's origin. */
  url?: string;
  /** The user id, on a server without tokens (absent: a `guest-…` id). With a token, it must equal its `sub`. */
  user?: string;
  /** The application's JWT. */
  token?: string;
  /**
   * Returns a fresh token: called on `token_expiring` (then sent as `refresh`),
   * before reconnecting after the token ran out (close 4001, `token_expired`),
   * and before the first connection when there is no `token`.
   */
  getToken?: () => string | Promise<string>;
  /** 'auto' (default): WebSocket, and an event stream when WebSockets never open. */
  transport?: 'auto' | 'websocket' | 'ws' | 'sse';
  /** The WebSocket constructor (default: the global one; Node 20 needs --experimental-websocket). */
  WebSocket?: new (url: string) => WebSocket;
  /** The fetch function, for the probe, event streams and POSTs (default: the global one). */
  fetch?: typeof fetch;
  /** Reconnect backoff: full jitter under min(capMs, baseMs * 2^attempt). Default 500 ms, 15 s. */
  backoff?: { baseMs?: number; capMs?: number };
  /** In 'auto', WebSockets that never open (while the server would take them) before SSE. Default 3. */
  wsFailuresBeforeSse?: number;
  /**
   * Over a WebSocket: acknowledge what the listeners processed (`acks=client`)
   * and resume the session after a lost connection, so nothing sent meanwhile
   * is lost or delivered twice. Default true.
   */
  resume?: boolean;
  /** How long an acknowledgement may wait to cover more deliveries. Default 100 ms. */
  ackDelayMs?: number;
}

export interface SubscribeOptions {
  /** The room's last messages to get first (as `message` events with `history: true`). */
  history?: number;
}

export interface Welcome {
  type: 'welcome';
  user: string;
  session: string;
  node: string;
  rooms: string[];
  room?: string;
  members?: string[];
  members_total?: number;
  /** Anonymous servers: the session's posting token (the client uses it for POSTs). */
  token?: string;
  [field: string]: unknown;
}

export interface ChatMessage {
  type: 'message';
  id: string;
  room: string;
  from: string;
  text: string;
  ts: number;
  /** The delivery's number on this connection (with acknowledgements on). */
  seq?: number;
  /** From the room's history (on subscribe, or after a resume that could not recover). */
  history?: boolean;
  [field: string]: unknown;
}

export interface DirectMessage {
  type: 'direct';
  id: string;
  from: string;
  to: string;
  text: string;
  ts: number;
  [field: string]: unknown;
}

export interface Subscription {
  room: string;
  /** Everyone in the room, ourselves included. */
  members: Set<string>;
  /** The room's size; larger than `members.size` for a large room (PROTOCOL.md, "Large rooms"). */
  membersTotal: number;
  /** True when this is the room subscribed again after a reconnect. */
  restored: boolean;
}

export interface WarrenClientEvents {
  state: { state: ClientState; previous: ClientState };
  connecting: { transport: TransportKind; attempt: number; reconnect: boolean };
  connected: { user: string; session: string; node: string; transport: TransportKind; reconnected: boolean; welcome: Welcome };
  /** Lost (or never opened); a reconnect follows after `delayMs`. */
  disconnected: {
    transport: TransportKind;
    /** Whether the socket or stream had opened. */
    opened: boolean;
    /** The WebSocket close code. */
    code?: number;
    reason?: string;
    /** Why, when known: a refusal, `unreachable`, `connect_failed`, `token_expired`… */
    error: WarrenError | null;
    willRetry: true;
    delayMs: number;
  };
  /** For good: close() (error null), or a failure that retrying cannot cure. */
  closed: { error: WarrenError | null; code?: number; reason?: string };
  /** 'auto' moved to another transport. */
  transport: { transport: TransportKind; reason: WarrenError };
  subscribed: Subscription;
  unsubscribed: { room: string };
  /** The server refused a room (also on a reconnect); the room is dropped. */
  subscribeError: { room: string; error: WarrenError };
  /** A room's member set changed; `joins`/`leaves` are what changed for us. */
  presence: { room: string; joins: string[]; leaves: string[]; members: Set<string>; resync: boolean };
  message: ChatMessage;
  /**
   * This connection fell further behind than its queue on the server holds, and
   * `missed` messages were lost here, in order with the `message`/`direct`
   * events: in `room`, or among direct messages (`room` null). A room's
   * history can fill it.
   */
  gap: { room: string | null; missed: number };
  /** A connection of `to` acknowledged the direct message `id` sent with `receipt: true`. */
  delivered: { id: string; to: string };
  /** After a lost connection: the session was resumed (`recovered`: nothing was lost) or not. */
  resumed: { session: string; recovered: boolean; rooms: string[] };
  /** A page of a room's history (its messages also come as `message` events). */
  history: { room: string; messages: ChatMessage[]; complete: boolean };
  direct: DirectMessage;
  /** An `error` frame answering nothing we wait for (e.g. `unavailable` before a 1013 close). */
  error: WarrenError;
  tokenExpiring: { expiresAt: number };
  refreshed: { expiresAt: number };
  /** Every server frame, as received, before the client acts on it. */
  frame: { type: string; [field: string]: unknown };
}

export class WarrenClient {
  constructor(options?: WarrenClientOptions);

  readonly state: ClientState;
  readonly transport: TransportKind;
  readonly user: string | undefined;
  readonly session: string | undefined;
  readonly node: string | undefined;
  /** The rooms subscribed now. */
  readonly rooms: string[];
  /** A copy of a room's member set. */
  members(room: string): Set<string>;

  on<K extends keyof WarrenClientEvents>(name: K, listener: (detail: WarrenClientEvents[K]) => void): () => void;
  off<K extends keyof WarrenClientEvents>(name: K, listener: (detail: WarrenClientEvents[K]) => void): void;

  /** Connects (and keeps reconnecting); resolves with the `welcome`. */
  connect(): Promise<Welcome>;
  /** Ends the session; pending requests reject with `closed`. */
  close(): void;
  /** While waiting to reconnect: try now. */
  reconnectNow(): void;

  /** Subscribes now and after every reconnect; rejects with the server's refusal. */
  subscribe(room: string, options?: SubscribeOptions): Promise<Subscription>;
  unsubscribe(room: string): Promise<void>;

  /** Resolves on the server's ack (over SSE: the POST's 202). */
  send(room: string, text: string): Promise<{ id: string }>;
  sendDirect(to: string, text: string, options?: { receipt?: boolean }): Promise<{ id: string }>;

  /** Replaces the session's token (same user). */
  refresh(token: string): Promise<{ expiresAt: number | undefined }>;
}
