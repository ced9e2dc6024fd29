// The chat page on a Warren that requires tokens: opened with ?token=, it
// connects without a name, shows the token's user, and chats; without a token
// it is told to sign in.
//
//   node tests/browser/token.mjs <base-url> <token-for-alice> <artifact-dir>
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

const STEP_TIMEOUT_MS = 10_000;
const [baseArg, token, artifactArg] = process.argv.slice(2);
if (!baseArg || !token || !artifactArg) {
  console.error('usage: node token.mjs <base-url> <token> <artifact-dir>');
  process.exit(2);
}
const base = baseArg.replace(/\/+$/, '');
fs.mkdirSync(artifactArg, { recursive: true });
let passed = 0;
const ok = (what) => { passed++; console.log(`ok - ${what}`); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run'],
});
let code = 0;
try {
  const ctx = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const signedIn = await ctx.newPage();
  await signedIn.goto(`${base}/?token=${encodeURIComponent(token)}&room=signed`, { waitUntil: 'load' });
  await signedIn.click('#join');
  await signedIn.waitForSelector('#status[data-state="connected"]', { timeout: STEP_TIMEOUT_MS });
  const title = await signedIn.getAttribute('#status', 'title');
  if (!title || !title.includes('connected as alice')) throw new Error(`status title is ${title}`);
  ok('opened with ?token=, the page connects as the token\'s user');
  await signedIn.fill('#text', 'signed message');
  await signedIn.click('#send');
  await signedIn.waitForSelector('#messages .msg.own.delivered[data-ref] .text', { timeout: STEP_TIMEOUT_MS });
  ok('a message sent signed in is delivered');

  const anonymous = await ctx.newPage();
  await anonymous.goto(`${base}/`, { waitUntil: 'load' });
  await anonymous.fill('#name', 'mallory');
  await anonymous.fill('#room', 'signed');
  await anonymous.click('#join');
  await anonymous.waitForSelector('#error[data-code="token_required"]:not([hidden])', { timeout: STEP_TIMEOUT_MS });
  ok('without a token the page is told to sign in, and stops');
  await signedIn.screenshot({ path: path.join(artifactArg, 'chat-token.png') });
} catch (e) {
  console.log(`not ok - ${e && e.message ? e.message : e}`);
  code = 1;
} finally {
  await browser.close().catch(() => {});
}
console.log(`${passed} passed, ${code} failed`);
process.exit(code);
