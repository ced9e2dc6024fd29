// End-to-end browser test of the Warren chat page with Debian's Chromium.
//
//   node tests/browser/chat.mjs <base-url> <artifact-dir>
//
// Two users in two separate browser contexts join a fresh room, exchange a
// message and an XSS probe, and screenshots are saved to <artifact-dir>.
// Exits 0 when every check passes, 1 otherwise.
import { chromium } from 'playwright-core';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

const OVERALL_TIMEOUT_MS = 60_000;
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
const userA = `alice-${suffix()}`;
const userB = `bob-${suffix()}`;
const HELLO = 'hello from A';
const XSS = '<img src=x onerror="window.__xss=1">';

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

async function join(page, name) {
  await page.fill('#name', name);
  await page.fill('#room', room);
  await page.click('#join');
}

async function waitConnected(page, label) {
  await page.waitForSelector('#status[data-state="connected"]', { timeout: STEP_TIMEOUT_MS });
  const text = await page.textContent('#status');
  if (!/connected/i.test(text || '')) fail(`${label}: #status says "${text}" but data-state=connected`);
}

async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
}

// Waits until #messages holds a .msg from `from` whose .text equals `text`
// exactly (and matches `extra`, e.g. '.own.delivered[data-ref]').
async function waitForMessage(page, label, from, text, extra = '') {
  try {
    await page.waitForFunction(
      ([f, t, sel]) => Array.from(document.querySelectorAll('#messages .msg' + sel))
        .some((m) => m.dataset.from === f && m.querySelector('.text')?.textContent === t),
      [from, text, extra],
      { timeout: STEP_TIMEOUT_MS },
    );
  } catch (e) {
    const seen = await page.$$eval('#messages .msg', (ns) => ns.map((m) =>
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

  await step('a second tab with a taken name is told so and stops reconnecting', async () => {
    const pageC = await ctxB.newPage();
    watch(pageC, 'C');
    try {
      await pageC.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_TIMEOUT_MS });
      await join(pageC, userA);
      await pageC.waitForSelector('#error[data-code="user_taken"]:not([hidden])', { timeout: STEP_TIMEOUT_MS });
      const st = await pageC.getAttribute('#status', 'data-state');
      if (st !== 'disconnected') fail(`status is ${st} after user_taken, expected disconnected`);
    } finally {
      await pageC.close();
    }
  });

  await step(`screenshots saved to ${artifactDir}`, async () => {
    await pageA.screenshot({ path: path.join(artifactDir, 'chat-a.png') });
    await pageB.screenshot({ path: path.join(artifactDir, 'chat-b.png') });
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
