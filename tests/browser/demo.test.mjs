// Drives the demo page (GET /, built on @lockstep/client's browser bundle) in headless
// Chromium: two users (two browser contexts) in one room see each other's presence, focus,
// live cursor and lock badges; a denied lock names the holder with a countdown; a viewer is
// refused; a queued wait is granted on release; an owner force-releases; and a page that goes
// offline (context.setOffline) resumes its session with its lock, unseen by the other page.
// Run through scripts/browser-test.sh, which builds and starts a dev-mode server and sets LOCKSTEP_URL.
//
//   LOCKSTEP_URL=http://127.0.0.1:8080 node --test demo.test.mjs   (against a running dev-mode node)
//
// Screenshots go to $LOCKSTEP_SCREENSHOTS (default: <tmpdir>/lockstep-browser).
//
// Chromium's offline emulation does not close an open WebSocket: it stalls it (no frame moves
// either way, and none is lost: what was queued is delivered once back online), while new
// connections fail at once. Only the SDK's app-level ping notices, so the pages here pass
// ?ping=1000&pong=1500 (pingIntervalMs / pongTimeoutMs) and ?backoff=1000 (longest reconnect delay).

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.LOCKSTEP_URL;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = process.env.LOCKSTEP_SCREENSHOTS || join(tmpdir(), "lockstep-browser");
const STEP_MS = 10_000; // how long any one expectation may take to come true (a busy 2-core machine)
// A fresh room per run, so sessions parked by an earlier run (closed tabs stay for the resume grace) don't show up.
const ROOM = `scene:bt-${Date.now().toString(36)}`;
const ROOM_ID = ROOM.slice(ROOM.indexOf(":") + 1);
const SEG = (n) => `segment:${ROOM_ID}-${n}`;
const SEG3 = SEG(3);
const DENIAL = /🔒 Alice is approving this segment, about (\d+) s left/;

let browser;
const problems = []; // page errors and console errors, from every page
const users = {};    // name -> {ctx, page, userId, sessionId, offline}

async function open(name, role) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await ctx.newPage();
  page.setDefaultTimeout(STEP_MS);
  const u = { ctx, page, offline: false };
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    // Chromium logs every refused connection attempt; while offline those are the point.
    if (u.offline && /WebSocket connection to .* failed/.test(m.text())) return;
    problems.push(`${name}: console error: ${m.text()}`);
  });
  const q = new URLSearchParams({ name, room: ROOM, ping: "1000", pong: "1500", backoff: "1000", ...(role ? { role } : {}) });
  await page.goto(`${BASE}/?${q}`);
  await page.waitForFunction(() => window.lockstep && window.lockstep.client && window.lockstep.client.status === "connected");
  Object.assign(u, await page.evaluate(() => ({ userId: window.lockstep.client.session.user.id, sessionId: window.lockstep.client.session.sessionId })));
  // Joined: our own entry is in the member list.
  await page.locator(`[data-testid=member][data-session="${u.sessionId}"]`).waitFor();
  return (users[name] = u);
}

const card = (page, resource) => page.locator(`[data-testid=segment][data-resource="${resource}"]`);
const inCard = (page, resource, testid) => card(page, resource).locator(`[data-testid=${testid}]`);
const approve = (page, resource) => card(page, resource).locator("button[data-act=lock][data-action=approve]").click();
// Polls a predicate in the page until it holds.
const until = (page, fn, arg) => page.waitForFunction(fn, arg, { timeout: STEP_MS });
// The SDK's view of a lock in the demo's room, as plain data.
const lockOf = (page, resource) => page.evaluate((r) => {
  const l = window.lockstep.room.locks.get(r);
  return l ? { holder: l.holder.name, sessionId: l.holder.sessionId, action: l.action, mine: l.mine } : null;
}, resource);
const heldOf = (page, resource) => page.evaluate((r) => {
  const l = window.lockstep.room.locks.held.find((x) => x.resource === r);
  return l ? { token: l.token, state: l.state, action: l.action } : null;
}, resource);

describe("demo page on @lockstep/client: two users in one room", { timeout: 120_000 }, () => {
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
    // Closing a context fires pagehide, where the page ends its session (1000) instead of
    // leaving it parked for the resume grace.
    for (const u of Object.values(users)) await u.ctx.close().catch(() => {});
    await browser?.close();
  });

  it("the page loads the SDK bundle the binary embeds", async () => {
    const res = await fetch(`${BASE}/lockstep-client.js`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type"), /^text\/javascript/);
    assert.equal(res.headers.get("cache-control"), "no-cache");
    const etag = res.headers.get("etag");
    assert.match(etag, /^"[0-9a-f]{16}"$/);
    assert.match(await res.text(), /Lockstep/);
    const again = await fetch(`${BASE}/lockstep-client.js`, { headers: { "if-none-match": etag } });
    assert.equal(again.status, 304);
    const { Alice } = users;
    assert.equal(await Alice.page.evaluate(() => typeof window.lockstep.client.room), "function");
  });

  it("each user sees the other in the member list, and the status tier is shown", async () => {
    const { Alice, Bob } = users;
    for (const [me, other, name] of [[Alice, Bob, "Bob"], [Bob, Alice, "Alice"]]) {
      const li = me.page.locator(`[data-testid=member][data-session="${other.sessionId}"]`);
      await li.waitFor();
      assert.match(await li.innerText(), new RegExp(`^${name}\\s+editor`));
      const members = await me.page.evaluate(() => window.lockstep.room.members.map((m) => m.name).sort());
      assert.deepEqual(members, ["Alice", "Bob"]);
    }
    const status = Alice.page.getByTestId("status");
    assert.equal(await status.getAttribute("data-status"), "connected");
    assert.match(await status.innerText(), /connected as Alice/);
    assert.deepEqual(await Alice.page.evaluate(() => window.lockstep.state.statusLog.map((s) => s.status)), ["connecting", "connected"]);
  });

  it("Alice hovering and clicking segment 3 shows her focus on Bob's page", async () => {
    const { Alice, Bob } = users;
    await card(Alice.page, SEG3).locator(".thumb").hover();
    await card(Alice.page, SEG3).locator(".thumb").click(); // pins the focus
    await until(Alice.page, (r) => window.lockstep.state.pinned === r, SEG3);
    await until(Bob.page, ([s, r]) => (window.lockstep.room.members.find((m) => m.sessionId === s) || {}).focus === r, [Alice.sessionId, SEG3]);
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
    // Same viewport on both pages: the arrow's tip lands within a few pixels of Alice's pointer
    // (the SDK throttles cursors, latest wins, so the last position always arrives).
    await until(Bob.page, ([s, x, y]) => {
      const e = document.querySelector(`[data-testid=cursor][data-session="${s}"]`);
      const r = e && e.getBoundingClientRect();
      return r && Math.abs(r.left - x) <= 4 && Math.abs(r.top - y) <= 4;
    }, [Alice.sessionId, target.x, target.y]);
    const c = await Bob.page.evaluate((s) => window.lockstep.room.cursors.get(s), Alice.sessionId);
    assert.ok(c && c.x > 0 && c.x < 1 && c.y > 0 && c.y < 1 && c.userId === Alice.userId, `cursor in the SDK: ${JSON.stringify(c)}`);
  });

  it("Alice approving segment 3 shows a lock badge with her name on Bob's page", async () => {
    const { Alice, Bob } = users;
    await approve(Alice.page, SEG3);
    await inCard(Alice.page, SEG3, "my-lock").getByText(/You are approving · \d+ s left/).waitFor();
    const badge = inCard(Bob.page, SEG3, "lock-badge");
    await badge.waitFor();
    assert.match(await badge.innerText(), /🔒 Alice is approving this segment, about \d+ s left/);
    assert.deepEqual(await lockOf(Bob.page, SEG3), { holder: "Alice", sessionId: Alice.sessionId, action: "approve", mine: false });
    // Editors get no force-release button; only segment 3 is held.
    assert.equal(await badge.locator("button[data-act=force]").isVisible(), false);
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
    assert.ok(n >= 30 && n <= 60, `about ${n} s left (lock is 60 s)`);
    const d = await Bob.page.evaluate((r) => window.lockstep.state.denials[r], SEG3);
    assert.equal(d.holder.name, "Alice");
    assert.equal(d.holder.action, "approve");
    // Bob got no lock; Alice still holds hers.
    assert.equal(await heldOf(Bob.page, SEG3), null);
    assert.equal((await heldOf(Alice.page, SEG3)).state, "held");
    // Key moment: both pages side by side.
    await card(Alice.page, SEG3).locator(".thumb").hover(); // Alice's cursor and focus stay on segment 3
    await until(Bob.page, ([s, r]) => (window.lockstep.room.members.find((x) => x.sessionId === s) || {}).focus === r, [Alice.sessionId, SEG3]);
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
    await until(Bob.page, (r) => !window.lockstep.room.locks.get(r), SEG3);
    assert.equal(await heldOf(Alice.page, SEG3), null);
  });

  it("a viewer clicking Approve sees a forbidden notice and takes no lock", async () => {
    const { Alice, Bob } = users;
    const Victor = await open("Victor", "viewer");
    assert.equal(await Victor.page.evaluate(() => window.lockstep.room.self.role), "viewer");
    await Alice.page.locator(`[data-testid=member][data-session="${Victor.sessionId}"]`).getByText("viewer").waitFor();
    await approve(Victor.page, SEG3);
    const notice = inCard(Victor.page, SEG3, "notice");
    await notice.waitFor();
    assert.match(await notice.innerText(), /forbidden/);
    await Victor.page.screenshot({ path: join(SHOTS, "victor-forbidden.png") });
    for (const u of [Alice, Bob, Victor]) {
      assert.deepEqual(await u.page.evaluate(() => window.lockstep.room.locks.list.length), 0);
    }
    assert.equal(await Bob.page.locator("[data-testid=lock-badge]:visible").count(), 0);
    await Victor.ctx.close(); // the page closes its client (1000): Victor leaves at once
    await Bob.page.locator(`[data-testid=member][data-session="${Victor.sessionId}"]`).waitFor({ state: "detached" });
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
    // Alice releases: the server hands the lock to Bob in the same step.
    await inCard(Alice.page, SEG3, "my-lock").locator("button[data-act=release]").click();
    await inCard(Bob.page, SEG3, "my-lock").getByText(/You are approving · \d+ s left/).waitFor();
    await inCard(Bob.page, SEG3, "notice").getByText("It's yours now").waitFor();
    await inCard(Bob.page, SEG3, "denial").waitFor({ state: "hidden" });
    const badge = inCard(Alice.page, SEG3, "lock-badge");
    await badge.getByText(/🔒 Bob is approving this segment, about \d+ s left/).waitFor();
    await Alice.page.waitForTimeout(300); // the reply to Alice's release has surely arrived: the badge must stay
    assert.equal(await badge.isVisible(), true, "Alice's page dropped Bob's lock");
    assert.equal((await lockOf(Alice.page, SEG3)).holder, "Bob");
    assert.equal((await heldOf(Bob.page, SEG3)).state, "held");
    await Bob.page.getByTestId("queue").uncheck();
  });

  it("Bob extends his lock, Alice stops waiting for it, and chat reaches the other page", async () => {
    const { Alice, Bob } = users;
    const mine = inCard(Bob.page, SEG3, "my-lock");
    const before = (await Bob.page.evaluate((r) => window.lockstep.room.locks.held.find((l) => l.resource === r).expiresAt, SEG3));
    await mine.locator("button[data-act=extend]").click();
    await until(Bob.page, ([r, t]) => window.lockstep.room.locks.held.find((l) => l.resource === r).expiresAt >= t + 25_000, [SEG3, before]);
    await until(Alice.page, ([r, t]) => (window.lockstep.room.locks.get(r) || {}).expiresAt >= t + 25_000, [SEG3, before]);
    // Alice queues behind Bob, then gives up: the wait is cancelled on the server (lock.cancel_wait).
    await Alice.page.getByTestId("queue").check();
    await approve(Alice.page, SEG3);
    const denial = inCard(Alice.page, SEG3, "denial");
    await denial.getByText(/Bob is approving this segment, about \d+ s left — you are #1 in line/).waitFor();
    await denial.locator("button[data-act=cancel]").click();
    await inCard(Alice.page, SEG3, "notice").getByText("Stopped waiting").waitFor();
    await denial.waitFor({ state: "hidden" });
    await Alice.page.getByTestId("queue").uncheck();
    // Chat: typing shows on the other page, then the message.
    await Alice.page.getByTestId("chat-input").fill("trim segment 3 after Bob");
    await Bob.page.getByTestId("typing").getByText("Alice is typing…").waitFor();
    await Alice.page.getByTestId("chat-input").press("Enter");
    await Bob.page.getByTestId("log").getByText("💬 Alice: trim segment 3 after Bob").waitFor();
    await Alice.page.getByTestId("log").getByText("💬 you: trim segment 3 after Bob").waitFor();
  });

  it("an owner force-releases Bob's lock, and Bob's page says his lock ended", async () => {
    const { Alice, Bob } = users;
    const Olivia = await open("Olivia", "owner");
    const badge = inCard(Olivia.page, SEG3, "lock-badge");
    await badge.getByText(/🔒 Bob is approving this segment/).waitFor();
    await badge.locator("button[data-act=force]").click();
    await inCard(Bob.page, SEG3, "notice").getByText("Your lock ended: forced").waitFor();
    await inCard(Bob.page, SEG3, "my-lock").waitFor({ state: "hidden" });
    await inCard(Alice.page, SEG3, "lock-badge").waitFor({ state: "hidden" });
    await until(Olivia.page, (r) => !window.lockstep.room.locks.get(r), SEG3);
    assert.equal(await heldOf(Bob.page, SEG3), null);
    await Olivia.ctx.close();
    await Alice.page.locator(`[data-testid=member][data-session="${Olivia.sessionId}"]`).waitFor({ state: "detached" });
  });

  it("Alice going offline resumes her session with her lock, and Bob never sees her leave", async () => {
    const { Alice, Bob } = users;
    const SEG2 = SEG(2);
    await approve(Alice.page, SEG2);
    await inCard(Bob.page, SEG2, "lock-badge").getByText(/🔒 Alice is approving/).waitFor();
    // Bob's badge comes from the room's lock.acquired, which may reach him before Alice's
    // page has read her grant reply: wait for her handle.
    await until(Alice.page, (r) => window.lockstep.room.locks.held.some((l) => l.resource === r), SEG2);
    const before = await heldOf(Alice.page, SEG2);
    assert.equal(before.state, "held");
    const statusMark = await Alice.page.evaluate(() => window.lockstep.state.statusLog.length);
    const presenceMark = await Bob.page.evaluate(() => window.lockstep.state.presenceLog.length);

    Alice.offline = true;
    await Alice.ctx.setOffline(true);
    // The stalled socket answers no ping: the SDK gives it up and keeps trying to reconnect.
    const status = Alice.page.getByTestId("status");
    await until(Alice.page, () => document.querySelector("[data-testid=status]").dataset.status === "reconnecting");
    assert.match(await status.innerText(), /reconnecting/);
    // Bob still sees Alice and her lock while she is away.
    assert.equal(await Bob.page.locator(`[data-testid=member][data-session="${Alice.sessionId}"]`).count(), 1);
    // A focus change made while offline waits in the SDK's queue and is sent after the resume.
    const SEG5 = SEG(5);
    await card(Alice.page, SEG5).locator(".thumb").click(); // pins segment 5
    await until(Alice.page, (r) => window.lockstep.state.focus === r, SEG5);
    await Alice.page.screenshot({ path: join(SHOTS, "alice-offline.png") });

    await Alice.ctx.setOffline(false);
    await until(Alice.page, () => document.querySelector("[data-testid=status]").dataset.status === "connected");
    Alice.offline = false;
    const tiers = await Alice.page.evaluate((n) => window.lockstep.state.statusLog.slice(n).map((s) => s.status), statusMark);
    assert.equal(tiers[0], "reconnecting", `statuses after going offline: ${tiers}`);
    assert.equal(tiers[tiers.length - 1], "connected", `statuses after going offline: ${tiers}`);
    assert.ok(!tiers.includes("disconnected"), `statuses after going offline: ${tiers}`);
    // The same session, the same lock with the same token.
    assert.equal(await Alice.page.evaluate(() => window.lockstep.client.session.sessionId), Alice.sessionId);
    assert.deepEqual(await heldOf(Alice.page, SEG2), before);
    await inCard(Alice.page, SEG2, "my-lock").getByText(/You are approving · \d+ s left/).waitFor();
    await Alice.page.getByTestId("log").getByText(`resumed session ${Alice.sessionId}`).waitFor();
    // Bob: Alice never left, her lock never moved.
    const seen = await Bob.page.evaluate((n) => window.lockstep.state.presenceLog.slice(n), presenceMark);
    assert.deepEqual(seen.filter((e) => e.sessionId === Alice.sessionId && e.type !== "update"), [], `Bob saw ${JSON.stringify(seen)}`);
    assert.deepEqual(await lockOf(Bob.page, SEG2), { holder: "Alice", sessionId: Alice.sessionId, action: "approve", mine: false });
    // The focus set while offline reached Bob, and both pages agree on it.
    await until(Bob.page, ([s, r]) => (window.lockstep.room.members.find((m) => m.sessionId === s) || {}).focus === r, [Alice.sessionId, SEG5]);
    await until(Alice.page, (r) => window.lockstep.room.self.focus === r, SEG5);
    // And the resumed socket works: Alice's cursor reaches Bob again.
    const t = await Bob.page.evaluate(() => Date.now());
    await Alice.page.mouse.move(300, 300);
    await Alice.page.mouse.move(420, 360, { steps: 6 });
    await until(Bob.page, ([s, t]) => { const c = window.lockstep.room.cursors.get(s); return c && c.at >= t; }, [Alice.sessionId, t]);
    await Alice.page.screenshot({ path: join(SHOTS, "alice-resumed.png") });
    await Bob.page.screenshot({ path: join(SHOTS, "bob-after-resume.png") });
    await inCard(Alice.page, SEG2, "my-lock").locator("button[data-act=release]").click();
    await inCard(Bob.page, SEG2, "lock-badge").waitFor({ state: "hidden" });
  });

  it("Simulate drop closes Bob's socket (4000), and the SDK resumes his session", async () => {
    const { Alice, Bob } = users;
    const statusMark = await Bob.page.evaluate(() => window.lockstep.state.statusLog.length);
    const presenceMark = await Alice.page.evaluate(() => window.lockstep.state.presenceLog.length);
    await Bob.page.locator("#drop").click();
    await Bob.page.getByTestId("log").getByText(`resumed session ${Bob.sessionId}`).waitFor();
    await until(Bob.page, () => window.lockstep.client.status === "connected");
    const tiers = await Bob.page.evaluate((n) => window.lockstep.state.statusLog.slice(n).map((s) => s.status), statusMark);
    assert.deepEqual(tiers, ["reconnecting", "connected"]);
    const seen = await Alice.page.evaluate((n) => window.lockstep.state.presenceLog.slice(n), presenceMark);
    assert.deepEqual(seen.filter((e) => e.sessionId === Bob.sessionId && e.type !== "update"), [], `Alice saw ${JSON.stringify(seen)}`);
  });

  it("no page errors or console errors", () => {
    assert.deepEqual(problems, []);
  });
});
