// Drives the demo page (GET /) in headless Chromium: two users (two browser contexts) in one
// room see each other's presence, focus, live cursor and lock badges; a denied lock names the
// holder with a countdown; a viewer is refused. Run through scripts/browser-test.sh, which
// builds and starts a dev-mode server and sets LOCKSTEP_URL.
//
//   LOCKSTEP_URL=http://127.0.0.1:8080 node --test            (against a running dev-mode node)
//
// Screenshots of both pages at the denial go to $LOCKSTEP_SCREENSHOTS (default: <tmpdir>/lockstep-browser).

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.LOCKSTEP_URL;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = process.env.LOCKSTEP_SCREENSHOTS || join(tmpdir(), "lockstep-browser");
const STEP_MS = 5000; // how long any one expectation may take to come true
// A fresh room per run, so sessions parked by an earlier run (closed tabs stay for the resume grace) don't show up.
const ROOM = `scene:bt-${Date.now().toString(36)}`;
const ROOM_ID = ROOM.slice(ROOM.indexOf(":") + 1);
const SEG3 = `segment:${ROOM_ID}-3`;
const DENIAL = /🔒 Alice is approving this segment, about (\d+) s left/;

let browser;
const problems = []; // page errors and console errors, from every page
const users = {};    // name -> {ctx, page, userId, sessionId}

async function open(name, role) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`); });
  const q = new URLSearchParams({ name, room: ROOM, ...(role ? { role } : {}) });
  await page.goto(`${BASE}/?${q}`);
  await page.waitForFunction(() => window.lockstep && window.lockstep.state.status === "online");
  const me = await page.evaluate(() => ({ userId: window.lockstep.state.user.id, sessionId: window.lockstep.state.sessionId }));
  // Joined: our own entry is in the member list.
  await page.locator(`[data-testid=member][data-session="${me.sessionId}"]`).waitFor();
  return (users[name] = { ctx, page, ...me });
}

const card = (page, resource) => page.locator(`[data-testid=segment][data-resource="${resource}"]`);
const inCard = (page, resource, testid) => card(page, resource).locator(`[data-testid=${testid}]`);
const approve = (page, resource) => card(page, resource).locator("button[data-act=lock][data-action=approve]").click();
// Polls a predicate over window.lockstep.state until it holds.
const until = (page, fn, arg) => page.waitForFunction(fn, arg, { timeout: STEP_MS });

describe("demo page: two users in one room", { timeout: 45_000 }, () => {
  before(async () => {
    assert.ok(BASE, "set LOCKSTEP_URL to a dev-mode lockstep node (scripts/browser-test.sh does)");
    mkdirSync(SHOTS, { recursive: true });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
        "--no-first-run", "--disable-component-update", "--disable-sync"],
    });
    await open("Alice");
    await open("Bob");
  });

  after(async () => {
    await browser?.close();
  });

  it("each user sees the other in the member list", async () => {
    const { Alice, Bob } = users;
    for (const [me, other, name] of [[Alice, Bob, "Bob"], [Bob, Alice, "Alice"]]) {
      const li = me.page.locator(`[data-testid=member][data-session="${other.sessionId}"]`);
      await li.waitFor();
      assert.match(await li.innerText(), new RegExp(`^${name}\\s+editor`));
      const members = await me.page.evaluate(() => Object.values(window.lockstep.state.members).map((m) => m.name).sort());
      assert.deepEqual(members, ["Alice", "Bob"]);
    }
    assert.match(await Alice.page.getByTestId("status").innerText(), /online as Alice/);
  });

  it("Alice hovering and clicking segment 3 shows her focus on Bob's page", async () => {
    const { Alice, Bob } = users;
    await card(Alice.page, SEG3).locator(".thumb").hover();
    await card(Alice.page, SEG3).locator(".thumb").click(); // pins the focus
    await until(Alice.page, (r) => window.lockstep.state.pinned === r, SEG3);
    await until(Bob.page, ([s, r]) => (window.lockstep.state.members[s] || {}).focus === r, [Alice.sessionId, SEG3]);
    const aliceLi = Bob.page.locator(`[data-testid=member][data-session="${Alice.sessionId}"]`);
    await aliceLi.getByText("looking at segment 3").waitFor();
    await card(Bob.page, SEG3).locator(".face[title=Alice]").waitFor();
  });

  it("Alice's cursor over the timeline appears on Bob's page where she points", async () => {
    const { Alice, Bob } = users;
    const box = await Alice.page.getByTestId("timeline").boundingBox();
    const target = { x: Math.round(box.x + box.width * 0.6), y: Math.round(box.y + box.height * 0.4) };
    await Alice.page.mouse.move(box.x + 20, box.y + 20);
    await Alice.page.mouse.move(target.x, target.y, { steps: 8 });
    const cursor = Bob.page.locator(`[data-testid=cursor][data-session="${Alice.sessionId}"]`);
    await cursor.waitFor();
    assert.equal((await cursor.innerText()).trim(), "Alice");
    // Same viewport on both pages: the arrow's tip lands within a few pixels of Alice's pointer.
    await until(Bob.page, ([s, x, y]) => {
      const e = document.querySelector(`[data-testid=cursor][data-session="${s}"]`);
      const r = e && e.getBoundingClientRect();
      return r && Math.abs(r.left - x) <= 4 && Math.abs(r.top - y) <= 4;
    }, [Alice.sessionId, target.x, target.y]);
    const c = await Bob.page.evaluate((s) => window.lockstep.state.cursors[s], Alice.sessionId);
    assert.ok(c && c.x > 0 && c.x < 1 && c.y > 0 && c.y < 1, `cursor in state: ${JSON.stringify(c)}`);
  });

  it("Alice approving segment 3 shows a lock badge with her name on Bob's page", async () => {
    const { Alice, Bob } = users;
    await approve(Alice.page, SEG3);
    await inCard(Alice.page, SEG3, "my-lock").getByText(/You are approving · \d+ s left/).waitFor();
    const badge = inCard(Bob.page, SEG3, "lock-badge");
    await badge.waitFor();
    const text = await badge.innerText();
    assert.match(text, /Alice/);
    assert.match(text, /approving/);
    assert.match(text, /🔒 Alice is approving this segment, about \d+ s left/);
    const lock = await Bob.page.evaluate((r) => window.lockstep.state.locks[r], SEG3);
    assert.equal(lock.holder.name, "Alice");
    assert.equal(lock.action, "approve");
    // Only segment 3 is held.
    assert.equal(await Bob.page.locator("[data-testid=lock-badge]:visible").count(), 1);
  });

  it("Bob approving the same segment is denied with Alice's name and the time left", async () => {
    const { Alice, Bob } = users;
    await approve(Bob.page, SEG3);
    const denial = inCard(Bob.page, SEG3, "denial");
    await denial.waitFor();
    const m = DENIAL.exec(await denial.innerText());
    assert.ok(m, `denial text: ${await denial.innerText()}`);
    const n = Number(m[1]);
    assert.ok(n >= 40 && n <= 60, `about ${n} s left (lock is 60 s)`);
    const d = await Bob.page.evaluate((r) => window.lockstep.state.denials[r], SEG3);
    assert.equal(d.name, "Alice");
    assert.equal(d.action, "approve");
    // Bob got no lock; Alice still holds hers.
    assert.equal(await Bob.page.evaluate((r) => window.lockstep.state.mine[r], SEG3), undefined);
    assert.ok(await Alice.page.evaluate((r) => window.lockstep.state.mine[r], SEG3));
    // Key moment: both pages side by side.
    await card(Alice.page, SEG3).locator(".thumb").hover(); // Alice's cursor and focus stay on segment 3
    await until(Bob.page, ([s, r]) => (window.lockstep.state.members[s] || {}).focus === r, [Alice.sessionId, SEG3]);
    await Bob.page.waitForTimeout(200); // let the cursor transition settle
    await Alice.page.screenshot({ path: join(SHOTS, "alice-holding.png") });
    await Bob.page.screenshot({ path: join(SHOTS, "bob-denied.png") });
  });

  it("Alice releasing clears the badge and the denial on Bob's page", async () => {
    const { Alice, Bob } = users;
    await inCard(Alice.page, SEG3, "my-lock").locator("button[data-act=release]").click();
    await inCard(Alice.page, SEG3, "my-lock").waitFor({ state: "hidden" });
    await inCard(Bob.page, SEG3, "lock-badge").waitFor({ state: "hidden" });
    await inCard(Bob.page, SEG3, "denial").waitFor({ state: "hidden" });
    await until(Bob.page, (r) => !(r in window.lockstep.state.locks), SEG3);
    await until(Alice.page, (r) => !(r in window.lockstep.state.mine), SEG3);
  });

  it("a viewer clicking Approve sees a forbidden notice and takes no lock", async () => {
    const { Alice, Bob } = users;
    const Victor = await open("Victor", "viewer");
    const self = await Victor.page.evaluate(() => window.lockstep.state.members[window.lockstep.state.sessionId]);
    assert.equal(self.role, "viewer");
    await Alice.page.locator(`[data-testid=member][data-session="${Victor.sessionId}"]`).getByText("viewer").waitFor();
    await approve(Victor.page, SEG3);
    const notice = inCard(Victor.page, SEG3, "notice");
    await notice.waitFor();
    assert.match(await notice.innerText(), /forbidden/);
    await Victor.page.screenshot({ path: join(SHOTS, "victor-forbidden.png") });
    for (const u of [Alice, Bob, Victor]) {
      assert.deepEqual(await u.page.evaluate(() => window.lockstep.state.locks), {});
    }
    assert.equal(await Bob.page.locator("[data-testid=lock-badge]:visible").count(), 0);
  });

  it("a queued Bob gets the lock when Alice releases, and Alice's page shows him holding it", async () => {
    const { Alice, Bob } = users;
    await approve(Alice.page, SEG3);
    await inCard(Bob.page, SEG3, "lock-badge").waitFor();
    await Bob.page.getByTestId("queue").check();
    await approve(Bob.page, SEG3);
    const denial = inCard(Bob.page, SEG3, "denial");
    await denial.getByText(/Alice is approving this segment, about \d+ s left — you are #1 in line/).waitFor();
    await denial.locator("button[data-act=cancel]").waitFor(); // "Stop waiting"
    // Alice releases: the server hands the lock to Bob in the same step. Alice's page sees
    // lock.released, lock.acquired (Bob) and only then the reply to her release.
    await inCard(Alice.page, SEG3, "my-lock").locator("button[data-act=release]").click();
    await inCard(Bob.page, SEG3, "my-lock").getByText(/You are approving · \d+ s left/).waitFor();
    await inCard(Bob.page, SEG3, "notice").getByText("It's yours now").waitFor();
    await inCard(Bob.page, SEG3, "denial").waitFor({ state: "hidden" });
    const badge = inCard(Alice.page, SEG3, "lock-badge");
    await badge.getByText(/🔒 Bob is approving this segment, about \d+ s left/).waitFor();
    await Alice.page.waitForTimeout(300); // the reply to Alice's release has surely arrived: the badge must stay
    assert.equal(await badge.isVisible(), true, "Alice's page dropped Bob's lock");
    assert.equal(await Alice.page.evaluate((r) => window.lockstep.state.locks[r].holder.name, SEG3), "Bob");
    // Clean up: Bob releases, both pages are clear.
    await inCard(Bob.page, SEG3, "my-lock").locator("button[data-act=release]").click();
    await badge.waitFor({ state: "hidden" });
    await until(Bob.page, (r) => !(r in window.lockstep.state.locks), SEG3);
  });

  it("no page errors or console errors", () => {
    assert.deepEqual(problems, []);
  });
});
