// End-to-end browser test of the Warren chat page with Debian's Chromium.
//
//   node tests/browser/chat.mjs <base-url> <artifact-dir>
//
// Two users in two separate browser contexts join a fresh room, exchange a
// message and an XSS probe, see each other in the member list, join a second
// room from the sidebar and talk there (with unread counts per room), and one
// of them opens a second tab under the same name that sees the same direct
// messages; closing it does not make that user leave. They exchange direct
// messages, and one gets `user_not_found` for a DM to a user who left. A third
// user joins over Server-Sent Events + HTTP POST (transport forced to SSE), and
// a fourth whose WebSocket cannot connect falls back to SSE on its own ("Auto").
// Screenshots are saved to <artifact-dir>. Exits 0 when every check passes, 1
// otherwise.
import { chromium } from 'playwright-core';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const OVERALL_TIMEOUT_MS = 120_000;
const STEP_TIMEOUT_MS = 10_000;

const [baseArg, artifactArg] = process.argv.slice(2);
if (!baseArg || !artifactArg) {
  console.error('usage: node chat.mjs <base-url> <artifact-dir>');
  process.exit(2);
}
const base = baseArg.replace(/\/+$/, '');
const artifactDir = path.resolve(artifactArg);

const suffix = () => crypto.randomBytes(4).toString('hex');
const room = `br-${suffix()}`;
const room2 = `br2-${suffix()}`;
const userA = `alice-${suffix()}`;
const userB = `bob-${suffix()}`;
const userC = `carol-${suffix()}`;
const userD = `dave-${suffix()}`;
const HELLO = 'hello from A';
const DM_AB = 'psst — just for you, B';
const DM_BA = 'got it, thanks A';
const DM_OFFLINE = 'are you still there?';
const TO_SSE = 'hi C, can you read this over SSE?';
const FROM_SSE = 'hello from C, posted over HTTP';
const DM_CB = 'a direct one from C over HTTP';
const DM_BC = 'and back to C over the event stream';
const XSS = '<img src=x onerror="window.__xss=1">';
const IN_ROOM2 = 'over in the second room';
const IN_ROOM1 = 'back in the first room';
const DM_TABS = 'a DM for all of your tabs';
const DM_TABS_REPLY = 'answered from one tab';
const AFTER_TAB_CLOSED = 'still here with one tab';

let passed = 0;
let browser = null;
const pages = {}; // label -> page, for failure screenshots
const problems = []; // page errors, CSP violations, failed assets

function ok(what) {
  passed++;
  console.log(`ok - ${what}`);
}

function fail(reason) {
  const err = new Error(reason);
  err.testFailure = true;
  throw err;
}

async function closeBrowser() {
  if (!browser) return;
  const b = browser;
  browser = null;
  await Promise.race([b.close().catch(() => {}), new Promise((r) => setTimeout(r, 5000))]);
}

const guard = setTimeout(async () => {
  console.log(`not ok - overall timeout of ${OVERALL_TIMEOUT_MS / 1000}s exceeded`);
  console.log(`${passed} passed, 1 failed`);
  await closeBrowser();
  process.exit(1);
}, OVERALL_TIMEOUT_MS);

// Step wrapper: turns Playwright timeouts into readable failures.
async function step(what, fn) {
  try {
    await fn();
  } catch (e) {
    const msg = e && e.testFailure ? e.message : `${what}: ${(e && e.message ? e.message : String(e)).split('\n')[0]}`;
    fail(msg);
  }
  ok(what);
}

function watch(page, label) {
  page.on('pageerror', (e) => problems.push(`[${label}] page error: ${e.message}`));
  page.on('console', (m) => {
    const t = m.text();
    if (m.type() === 'error' && /Content Security Policy|Refused to/i.test(t)) {
      problems.push(`[${label}] CSP violation: ${t}`);
    }
  });
  page.on('response', (r) => {
    const u = new URL(r.url());
    // /ws answers with 4xx/426 by design (plain-GET refusal check).
    if (r.status() >= 400 && u.pathname !== '/ws' && u.pathname !== '/favicon.ico') {
      problems.push(`[${label}] ${r.status()} for ${u.pathname}`);
    }
  });
}

async function join(page, name, transport = 'auto') {
  await page.fill('#name', name);
  await page.fill('#room', room);
  await page.selectOption('#transport-select', transport);
  await page.click('#join');
}

async function waitConnected(page, label, timeout = STEP_TIMEOUT_MS) {
  try {
    await page.waitForSelector('#status[data-state="connected"]', { timeout });
  } catch (e) {
    const status = await page.textContent('#status').catch(() => '?');
    const err = await page.$eval('#error', (n) => (n.hidden ? '' : `[${n.dataset.code || ''}] ${n.textContent}`)).catch(() => '?');
    fail(`${label}: not connected within ${timeout / 1000}s; #status "${status}"${err ? `; #error ${err}` : ''}`);
  }
  const text = await page.textContent('#status');
  if (!/connected/i.test(text || '')) fail(`${label}: #status says "${text}" but data-state=connected`);
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

async function waitTransport(page, label, kind) {
  const sel = `#transport[data-transport="${kind}"]`;
  await page.waitForSelector(sel, { timeout: STEP_TIMEOUT_MS, state: 'visible' });
  const want = kind === 'sse' ? 'SSE' : 'WebSocket';
  const text = await page.textContent('#transport');
  if (!(text || '').includes(want)) fail(`${label}: #transport says "${text}", expected it to mention ${want}`);
}

// The member list of a page (phone pages keep it in a closed drawer).
async function waitMember(page, label, user, present = true) {
  const sel = `#members .member[data-user="${user}"]`;
  try {
    await page.waitForSelector(sel, { timeout: STEP_TIMEOUT_MS, state: present ? 'attached' : 'detached' });
  } catch (e) {
    const names = await page.$$eval('#members .member', (ns) => ns.map((n) => n.dataset.user)).catch(() => []);
    fail(`${label}: ${user} ${present ? 'never appeared in' : 'never left'} #members (has: ${names.join(', ')})`);
  }
}

// Opens the @user conversation by clicking the name in the member list,
// opening the drawer first where the list is one (narrow screens).
async function openDirectFromMembers(page, label, user) {
  const sel = `#members .member[data-user="${user}"]`;
  if (!(await page.isVisible(sel))) {
    await page.click('#members-toggle');
    await page.waitForSelector(sel, { state: 'visible', timeout: STEP_TIMEOUT_MS });
  }
  await page.click(sel);
  await page.waitForSelector(`#conversations .conv[data-conv="@${user}"].active`, { timeout: STEP_TIMEOUT_MS });
  const kind = await page.getAttribute('#chat-view', 'data-kind');
  if (kind !== 'direct') fail(`${label}: #chat-view data-kind is ${kind} after opening @${user}`);
  if ((await page.getAttribute('#members-toggle', 'aria-expanded')) === 'true') {
    fail(`${label}: member drawer still open after picking ${user}`);
  }
}

// Joins another room from the sidebar form and waits until it is subscribed.
async function joinRoom(page, name) {
  await page.fill('#new-room', name);
  await page.click('#add-room-go');
  await page.waitForSelector(`#conversations .conv[data-conv="#${name}"].active`, { timeout: STEP_TIMEOUT_MS });
  await page.waitForFunction(
    (r) => Array.from(document.querySelectorAll(`#messages [data-conv="#${r}"] .sys`)).some((n) => n.textContent.startsWith('In #')),
    name,
    { timeout: STEP_TIMEOUT_MS },
  );
}

async function openConv(page, key) {
  await page.click(`#conversations .conv[data-conv="${key}"]`);
  await page.waitForSelector(`#conversations .conv[data-conv="${key}"].active`, { timeout: STEP_TIMEOUT_MS });
}

// Waits until the visible conversation in #messages holds a .msg from `from`
// whose .text equals `text` exactly (and matches `extra`, e.g.
// '.own.delivered[data-ref]').
async function waitForMessage(page, label, from, text, extra = '') {
  try {
    await page.waitForFunction(
      ([f, t, sel]) => Array.from(document.querySelectorAll('#messages .msg' + sel))
        .some((m) => m.dataset.from === f && m.querySelector('.text')?.textContent === t &&
          m.getClientRects().length > 0),
      [from, text, extra],
      { timeout: STEP_TIMEOUT_MS },
    );
  } catch (e) {
    const seen = await page.$$eval('#messages .msg', (ns) => ns.map((m) =>
      `${m.closest('[data-conv]')?.dataset.conv}${m.getClientRects().length ? '' : ' (hidden)'}: ` +
      `${m.className}${m.dataset.id ? ' id=' + m.dataset.id : ''} from=${m.dataset.from} ${JSON.stringify(m.querySelector('.text')?.textContent)}`))
      .catch(() => []);
    fail(`${label}: no .msg${extra} from ${from} with text ${JSON.stringify(text)} within ${STEP_TIMEOUT_MS / 1000}s; ` +
      `status=${JSON.stringify(await page.textContent('#status').catch(() => '?'))}; ` +
      `error=${JSON.stringify(await page.textContent('#error').catch(() => '?'))}; messages: [${seen.join(' | ')}]`);
  }
}

async function main() {
  fs.mkdirSync(artifactDir, { recursive: true });

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  ok(`launched ${browser.version()}`);

  // A is phone-sized, B is desktop-sized.
  const ctxA = await browser.newContext({ viewport: { width: 375, height: 740 }, deviceScaleFactor: 2, isMobile: false, hasTouch: true });
  const ctxB = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const pageA = await ctxA.newPage();
  const pageB = await ctxB.newPage();
  watch(pageA, 'A');
  watch(pageB, 'B');
  pages.a = pageA;
  pages.b = pageB;

  let respA;
  await step('GET / serves the page with a Content-Security-Policy header', async () => {
    respA = await pageA.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
    if (!respA) fail('no response for /');
    if (respA.status() !== 200) fail(`GET / returned ${respA.status()}`);
    const csp = (await respA.allHeaders())['content-security-policy'];
    if (!csp) fail('GET / has no Content-Security-Policy header');
    await pageB.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
  });

  await step('invalid name is rejected inline before connecting', async () => {
    await pageB.fill('#name', 'not valid!');
    await pageB.fill('#room', room);
    await pageB.click('#join');
    await pageB.waitForSelector('#error:not([hidden])', { timeout: STEP_TIMEOUT_MS });
    if (!(await pageB.isVisible('#join-form'))) fail('join form hidden after invalid name');
    const st = await pageB.getAttribute('#status', 'data-state');
    if (st !== 'disconnected') fail(`status is ${st} after invalid name, expected disconnected`);
  });

  await step(`both users join #${room} and show connected (${userA}, ${userB})`, async () => {
    await join(pageA, userA);
    await join(pageB, userB);
    await Promise.all([waitConnected(pageA, 'A'), waitConnected(pageB, 'B')]);
  });

  await step('both pages say they are connected via WebSocket', async () => {
    await waitTransport(pageA, 'A', 'ws');
    await waitTransport(pageB, 'B', 'ws');
  });

  await step('(a) both users see each other (and themselves) in #members', async () => {
    await waitMember(pageA, 'A', userB);
    await waitMember(pageA, 'A', userA);
    await waitMember(pageB, 'B', userA);
    await waitMember(pageB, 'B', userB);
    // B is on a desktop-sized page: the list is a visible sidebar there.
    if (!(await pageB.isVisible(`#members .member[data-user="${userA}"]`))) fail('B: member list not visible at desktop width');
    const count = await pageA.textContent('#member-count');
    if (count !== '2') fail(`A: #member-count says ${count}, expected 2`);
  });

  await step('A sends "hello from A"; B receives it from A and A\'s copy is delivered', async () => {
    await send(pageA, HELLO);
    await Promise.all([
      waitForMessage(pageB, 'B', userA, HELLO),
      // data-ref marks the element created on send: it must be the one the ack confirms.
      waitForMessage(pageA, 'A', userA, HELLO, '.own.delivered[data-ref]'),
    ]);
    const id = await pageA.$eval('#messages .msg.own.delivered[data-ref]', (m) => m.dataset.id);
    if (!id) fail('A\'s delivered message has no data-id');
  });

  await step('B sends an XSS probe; A shows it literally as text', async () => {
    await send(pageB, XSS);
    await waitForMessage(pageA, 'A', userB, XSS);
    await waitForMessage(pageB, 'B', userB, XSS, '.own.delivered[data-ref]');
  });

  await step('no <img> in #messages and window.__xss undefined in both pages', async () => {
    for (const [label, page] of [['A', pageA], ['B', pageB]]) {
      const imgs = await page.$$eval('#messages img', (n) => n.length);
      if (imgs !== 0) fail(`${label}: found ${imgs} <img> element(s) inside #messages`);
      const xss = await page.evaluate(() => typeof window.__xss);
      if (xss !== 'undefined') fail(`${label}: window.__xss is ${xss} — script ran`);
    }
  });

  await step('own messages are shown once (ack/echo deduplicated)', async () => {
    const count = (page, text) => page.$$eval('#messages .msg .text', (ns, t) => ns.filter((n) => n.textContent === t).length, text);
    const a = await count(pageA, HELLO);
    const b = await count(pageB, XSS);
    if (a !== 1) fail(`A shows "${HELLO}" ${a} times`);
    if (b !== 1) fail(`B shows the XSS probe ${b} times`);
  });

  // Protocol v2: one connection in several rooms, one user in several tabs.
  const pageA2 = await ctxA.newPage();
  watch(pageA2, 'A2');
  pages.a2 = pageA2;

  await step('(v2) A opens a second tab under the same name: both tabs are connected', async () => {
    await pageA2.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
    await join(pageA2, userA);
    await waitConnected(pageA2, 'A2');
    await waitConnected(pageA, 'A');
    await waitMember(pageA2, 'A2', userB);
  });

  await step(`(v2) A and B join a second room, #${room2}, from the sidebar; both rooms are listed`, async () => {
    await joinRoom(pageA, room2);
    await joinRoom(pageB, room2);
    await waitMember(pageB, 'B', userA);
    await waitMember(pageA, 'A', userB);
    for (const [label, page] of [['A', pageA], ['B', pageB]]) {
      for (const key of [`#${room}`, `#${room2}`]) {
        if (!(await page.$(`#conversations .conv[data-conv="${key}"]`))) fail(`${label}: ${key} not listed`);
      }
    }
  });

  await step(`(v2) B's message in #${room2} reaches A there, not in #${room}; one in #${room} while A looks at #${room2} shows as unread`, async () => {
    await send(pageB, IN_ROOM2);
    await waitForMessage(pageA, 'A', userB, IN_ROOM2);
    const inFirst = await pageA.$$eval(`#messages [data-conv="#${room}"] .msg .text`, (ns) => ns.map((x) => x.textContent));
    if (inFirst.includes(IN_ROOM2)) fail(`A: the #${room2} message was shown in #${room}`);
    await openConv(pageB, `#${room}`);
    await send(pageB, IN_ROOM1);
    const badge = `#conversations .conv[data-conv="#${room}"] .badge`;
    await pageA.waitForSelector(badge, { state: 'visible', timeout: STEP_TIMEOUT_MS });
    const n = (await pageA.textContent(badge) || '').trim();
    if (n !== '1') fail(`A: unread badge on #${room} says "${n}", expected 1`);
    await openConv(pageA, `#${room}`);
    await waitForMessage(pageA, 'A', userB, IN_ROOM1);
  });

  await step("(v2) B's DM reaches both of A's tabs; A's reply from one tab shows in the other", async () => {
    await openDirectFromMembers(pageB, 'B', userA);
    await send(pageB, DM_TABS);
    await pageA2.waitForSelector(`#conversations .conv[data-conv="@${userB}"]`, { timeout: STEP_TIMEOUT_MS });
    await openConv(pageA2, `@${userB}`);
    await waitForMessage(pageA2, 'A2', userB, DM_TABS, '.direct:not(.own)');
    await openConv(pageA, `@${userB}`);
    await waitForMessage(pageA, 'A', userB, DM_TABS, '.direct:not(.own)');
    await send(pageA, DM_TABS_REPLY);
    await waitForMessage(pageA, 'A', userA, DM_TABS_REPLY, '.own.direct.delivered[data-ref]');
    await waitForMessage(pageA2, 'A2', userA, DM_TABS_REPLY, '.own.direct');
    await waitForMessage(pageB, 'B', userA, DM_TABS_REPLY, '.direct:not(.own)');
  });

  await step("(v2) A closes one tab: A is still a member for B, and B's room shows no 'left'", async () => {
    await pageA2.close();
    delete pages.a2;
    await openConv(pageB, `#${room}`);
    await openConv(pageA, `#${room}`);
    // A message from A's remaining tab, after the close: presence had its
    // chance to flicker by the time it arrives.
    await pageA.waitForTimeout(300);
    await send(pageA, AFTER_TAB_CLOSED);
    await waitForMessage(pageB, 'B', userA, AFTER_TAB_CLOSED);
    await waitMember(pageB, 'B', userA);
    const sys = await pageB.$$eval('#messages .sys', (ns) => ns.map((n) => n.textContent));
    const flicker = sys.filter((t) => t.includes(userA) && /\bleft\b/.test(t));
    if (flicker.length) fail(`B saw A leave: ${flicker.join(' | ')}`);
  });

  await step('chat-a.png saved (phone width, room)', async () => {
    await pageA.screenshot({ path: path.join(artifactDir, 'chat-a.png'), animations: 'disabled' });
  });

  await step('(b) A clicks B in the member list and sends a DM; it is delivered and marked direct', async () => {
    await openDirectFromMembers(pageA, 'A', userB);
    await send(pageA, DM_AB);
    await waitForMessage(pageA, 'A', userA, DM_AB, '.own.direct.delivered[data-ref]');
    const to = await pageA.$eval('#messages .msg.own.direct[data-ref]', (m) => m.dataset.to);
    if (to !== userB) fail(`A: DM bubble has data-to=${to}, expected ${userB}`);
  });

  await step('(b) B gets a @A conversation with an unread badge; the DM is not in the room', async () => {
    const badge = `#conversations .conv[data-conv="@${userA}"] .badge`;
    await pageB.waitForSelector(badge, { state: 'visible', timeout: STEP_TIMEOUT_MS });
    const n = (await pageB.textContent(badge) || '').trim();
    if (n !== '1') fail(`B: unread badge on @${userA} says "${n}", expected 1`);
    const inRoom = await pageB.$$eval(`#messages [data-conv="#${room}"] .msg .text`, (ns) => ns.map((x) => x.textContent));
    if (inRoom.includes(DM_AB)) fail('B: the direct message was shown in the room conversation');
    if (!(await pageB.isVisible(`#messages [data-conv="#${room}"]`))) fail('B: room conversation no longer active after a DM arrived');
  });

  await step('(b) B opens @A, sees the DM with .direct, the badge clears, and replies', async () => {
    await openConv(pageB, `@${userA}`);
    await waitForMessage(pageB, 'B', userA, DM_AB, '.direct:not(.own)');
    if (await pageB.isVisible(`#conversations .conv[data-conv="@${userA}"] .badge`)) fail('B: unread badge still shown after opening @A');
    await send(pageB, DM_BA);
    await Promise.all([
      waitForMessage(pageB, 'B', userB, DM_BA, '.own.direct.delivered[data-ref]'),
      waitForMessage(pageA, 'A', userB, DM_BA, '.direct:not(.own)'),
    ]);
  });

  await step('chat-b.png saved (desktop, room with the DM conversation listed)', async () => {
    await openConv(pageB, `#${room}`);
    await pageB.screenshot({ path: path.join(artifactDir, 'chat-b.png'), animations: 'disabled' });
  });

  // (d) A third user joins with the transport forced to Server-Sent Events.
  const ctxC = await browser.newContext({ viewport: { width: 820, height: 700 } });
  const pageC = await ctxC.newPage();
  watch(pageC, 'C');
  pages.c = pageC;

  await step('(d) C joins with transport "sse", shows #transport[data-transport=sse] and the members', async () => {
    await pageC.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
    await join(pageC, userC, 'sse');
    await waitConnected(pageC, 'C');
    await waitTransport(pageC, 'C', 'sse');
    await waitMember(pageC, 'C', userA);
    await waitMember(pageC, 'C', userB);
    // Presence: A and B see C arrive.
    await waitMember(pageA, 'A', userC);
    await waitMember(pageB, 'B', userC);
  });

  await step('(d) C receives a room message from A over SSE', async () => {
    await openConv(pageA, `#${room}`);
    await send(pageA, TO_SSE);
    await waitForMessage(pageC, 'C', userA, TO_SSE);
  });

  await step('(d) C posts a room message: A receives it, C marks it delivered and shows it once', async () => {
    await send(pageC, FROM_SSE);
    await Promise.all([
      waitForMessage(pageA, 'A', userC, FROM_SSE),
      waitForMessage(pageC, 'C', userC, FROM_SSE, '.own.delivered[data-ref][data-id]'),
    ]);
    await pageC.waitForTimeout(400); // let the echo over SSE arrive, if it is late
    const n = await pageC.$$eval('#messages .msg .text', (ns, t) => ns.filter((x) => x.textContent === t).length, FROM_SSE);
    if (n !== 1) fail(`C shows its own message ${n} times`);
  });

  await step('(d) DMs over SSE + POST: C → B is delivered, B → C arrives as .direct', async () => {
    await openDirectFromMembers(pageC, 'C', userB);
    await send(pageC, DM_CB);
    await waitForMessage(pageC, 'C', userC, DM_CB, '.own.direct.delivered[data-ref]');
    await openConv(pageB, `@${userC}`);
    await waitForMessage(pageB, 'B', userC, DM_CB, '.direct:not(.own)');
    await send(pageB, DM_BC);
    await waitForMessage(pageC, 'C', userB, DM_BC, '.direct:not(.own)');
  });

  await step('(d) C closes its page; A sees C leave the member list', async () => {
    await pageC.close();
    delete pages.c;
    await waitMember(pageA, 'A', userC, false);
  });

  await step('(c) B leaves; A sees B leave, and a DM to B fails with user_not_found on the bubble', async () => {
    await pageB.click('#leave');
    await pageB.waitForSelector('#join-form', { state: 'visible', timeout: STEP_TIMEOUT_MS });
    await waitMember(pageA, 'A', userB, false);
    await openConv(pageA, `@${userB}`);
    await send(pageA, DM_OFFLINE);
    const sel = '#messages .msg.own.direct.failed .msg-error[data-code="user_not_found"]';
    try {
      await pageA.waitForSelector(sel, { state: 'visible', timeout: STEP_TIMEOUT_MS });
    } catch (e) {
      await waitForMessage(pageA, 'A', userA, DM_OFFLINE, '.failed'); // fails with a listing
      fail(`A: no ${sel}`);
    }
    const note = await pageA.textContent(sel);
    if (!note.includes(userB) || !/offline/i.test(note)) fail(`A: error note says "${note}"`);
    const text = await pageA.$eval(sel, (n) => n.closest('.msg').querySelector('.text').textContent);
    if (text !== DM_OFFLINE) fail(`A: user_not_found shown on the wrong bubble ("${text}")`);
  });

  await step('chat-dm.png saved (phone width, DM conversation)', async () => {
    await pageA.screenshot({ path: path.join(artifactDir, 'chat-dm.png'), animations: 'disabled' });
  });

  await step('Auto: a page whose WebSocket never opens falls back to SSE', async () => {
    const ctxD = await browser.newContext({ viewport: { width: 375, height: 740 }, deviceScaleFactor: 2, hasTouch: true });
    // Every WebSocket fails before `open`, as behind a proxy that drops upgrades.
    await ctxD.addInitScript(() => {
      class DeadSocket {
        constructor() {
          this.readyState = 0;
          setTimeout(() => {
            this.readyState = 3;
            if (this.onerror) this.onerror(new Event('error'));
            if (this.onclose) this.onclose({ code: 1006, reason: '', wasClean: false });
          }, 20);
        }
        send() { throw new Error('not open'); }
        close() {}
      }
      DeadSocket.CONNECTING = 0; DeadSocket.OPEN = 1; DeadSocket.CLOSING = 2; DeadSocket.CLOSED = 3;
      window.WebSocket = DeadSocket;
    });
    const pageD = await ctxD.newPage();
    watch(pageD, 'D');
    pages.d = pageD;
    try {
      await pageD.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
      await join(pageD, userD, 'auto');
      await waitConnected(pageD, 'D', 20_000);
      await waitTransport(pageD, 'D', 'sse');
      await waitMember(pageA, 'A', userD);
    } finally {
      await pageD.close();
      delete pages.d;
    }
  });

  await step('no page errors, CSP violations or failed assets', async () => {
    if (problems.length) fail(problems.join('; '));
  });
}

let code = 0;
const started = Date.now();
try {
  await main();
  console.log(`${passed} passed, 0 failed`);
} catch (e) {
  console.log(`not ok - ${e && e.message ? e.message : e}`);
  if (problems.length) console.log(`# also seen: ${problems.join('; ')}`);
  console.log(`${passed} passed, 1 failed`);
  code = 1;
  for (const [label, page] of Object.entries(pages)) {
    const file = path.join(artifactDir, `fail-${label}.png`);
    await Promise.race([
      page.screenshot({ path: file }).then(() => console.log(`# failure screenshot: ${file}`), () => {}),
      new Promise((r) => setTimeout(r, 3000)),
    ]);
  }
} finally {
  await closeBrowser();
  clearTimeout(guard);
  console.log(`# took ${((Date.now() - started) / 1000).toFixed(1)}s`);
}
process.exit(code);
