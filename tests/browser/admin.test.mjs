// Drives the operator console (GET /admin) in headless Chromium: sign in with the admin token,
// see a room's member and lock (holder, action, time left counting down), force-release the
// lock from the page (the holder's socket is told `forced`), then find the `lock_forced` audit
// record naming the admin as the actor in the page's audit search; the nodes tab lists the node.
// Run through scripts/browser-test.sh, which starts a dev-mode node with an admin token and
// sets LOCKSTEP_URL and LOCKSTEP_ADMIN_TOKEN.
//
//   LOCKSTEP_URL=http://127.0.0.1:8080 LOCKSTEP_ADMIN_TOKEN=… node --test admin.test.mjs
//
// Screenshots of the three tabs go to $LOCKSTEP_SCREENSHOTS (default: <tmpdir>/lockstep-browser).

import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.LOCKSTEP_URL;
const ADMIN = process.env.LOCKSTEP_ADMIN_TOKEN;
const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const SHOTS = process.env.LOCKSTEP_SCREENSHOTS || join(tmpdir(), "lockstep-browser");
const STEP_MS = 8000; // how long any one expectation may take to come true (the list refreshes every 5 s)
// A fresh room per run, so an earlier run's leftovers don't match.
const ID = `adm-${Date.now().toString(36)}`;
const ROOM = `scene:${ID}`;
const RESOURCE = `segment:${ID}-1`;

let browser;
let holder;  // a page whose WebSocket session (Carol) is in ROOM and holds the lock
let admin;   // the console
const problems = [];

function watch(page, name, { console = true } = {}) {
  page.setDefaultTimeout(STEP_MS);
  page.on("pageerror", (e) => problems.push(`${name}: page error: ${e.message}`));
  if (console) page.on("console", (m) => { if (m.type() === "error") problems.push(`${name}: console error: ${m.text()}`); });
}

async function devToken(sub, name, rooms) {
  const r = await fetch(`${BASE}/v1/dev/token`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ sub, name, ...(rooms ? { rooms } : {}) }),
  });
  assert.equal(r.status, 200, "dev token (the node must run in dev mode)");
  return (await r.json()).token;
}

const roomRow = () => admin.locator(`tr.room[data-room="${ROOM}"]`);
const lockRow = () => admin.locator(`tr.lock[data-resource="${RESOURCE}"]`);

describe("admin console", { timeout: 60_000 }, () => {
  before(async () => {
    assert.ok(BASE, "set LOCKSTEP_URL to a dev-mode lockstep node (scripts/browser-test.sh does)");
    assert.ok(ADMIN, "set LOCKSTEP_ADMIN_TOKEN to the node's admin token (scripts/browser-test.sh does)");
    mkdirSync(SHOTS, { recursive: true });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
        "--no-first-run", "--disable-component-update", "--disable-sync"],
    });
    // Carol, a real WebSocket session from a browser page: joins ROOM and locks RESOURCE.
    const token = await devToken(`carol-${ID}`, "Carol");
    holder = await (await browser.newContext()).newPage();
    // Its page is /healthz (JSON): Chromium's favicon request there fails, which is not ours.
    watch(holder, "holder", { console: false });
    await holder.goto(`${BASE}/healthz`);
    const granted = await holder.evaluate(async ({ url, token, room, resource }) => {
      const ws = new WebSocket(`${url}/v1/ws?token=${encodeURIComponent(token)}`, "lockstep.v1.json");
      window.frames_ = [];
      const next = (pred) => new Promise((resolve) => {
        const seen = window.frames_.find(pred);
        if (seen) return resolve(seen);
        ws.addEventListener("message", function on(ev) {
          const m = JSON.parse(ev.data);
          if (pred(m)) { ws.removeEventListener("message", on); resolve(m); }
        });
      });
      ws.addEventListener("message", (ev) => window.frames_.push(JSON.parse(ev.data)));
      window.ws_ = ws;
      await next((m) => m.type === "welcome");
      ws.send(JSON.stringify({ type: "join", room, id: 1, state: { focus: resource } }));
      await next((m) => m.type === "reply" && m.id === 1);
      ws.send(JSON.stringify({ type: "lock.acquire", room, resource, action: "approve", ttl_ms: 600000, id: 2 }));
      return await next((m) => m.id === 2);
    }, { url: BASE.replace(/^http/, "ws"), token, room: ROOM, resource: RESOURCE });
    assert.ok(granted.token, `lock granted: ${JSON.stringify(granted)}`);

    const ctx = await browser.newContext({ viewport: { width: 1280, height: 760 } });
    admin = await ctx.newPage();
    watch(admin, "admin");
  });

  after(async () => {
    await browser?.close();
  });

  it("refuses a bad token and signs in with the admin token, kept across a reload", async () => {
    await admin.goto(`${BASE}/admin`);
    await admin.fill("#token", "not-a-token");
    await admin.click("#loginform button[type=submit]");
    await admin.locator("#msg.err").waitFor();
    assert.equal(await admin.locator("#login").isVisible(), true);
    await admin.fill("#token", ADMIN);
    await admin.click("#loginform button[type=submit]");
    await admin.locator("#rooms").waitFor();
    await admin.reload();
    await roomRow().waitFor();
    assert.equal(await admin.locator("#login").isVisible(), false);
    assert.equal(await admin.evaluate(() => sessionStorage.getItem("lockstep.admin.token")), ADMIN);
  });

  it("shows the room with its member and the lock's holder, action and time left, counting down", async () => {
    const cells = await roomRow().locator("td").allInnerTexts();
    assert.deepEqual(cells, [ROOM, "1", "1"]);
    await roomRow().click();
    const member = admin.locator("tr.detailrow").filter({ hasText: "Carol" }).first();
    await member.waitFor();
    await lockRow().waitFor();
    const text = await lockRow().innerText();
    assert.match(text, /Carol/);
    assert.match(text, /approve/);
    const left = async () => lockRow().locator("td.timeleft").innerText();
    const first = await left();
    assert.match(first, /^(9|10) min \d\d s$/, first);
    await admin.waitForFunction((before) => {
      const el = document.querySelector("td.timeleft");
      return el && el.textContent !== before;
    }, first, { timeout: STEP_MS });
    await admin.screenshot({ path: join(SHOTS, "admin-rooms.png"), fullPage: true });
  });

  it("force-releases the lock from the page; the holder is told `forced`", async () => {
    const button = lockRow().locator("button.danger");
    await button.click();
    assert.match(await button.innerText(), /Release Carol's lock\?/);
    await button.click();
    await admin.locator("#msg.ok").filter({ hasText: RESOURCE }).waitFor();
    await lockRow().waitFor({ state: "detached" });
    const released = await holder.waitForFunction((resource) =>
      window.frames_.find((m) => m.type === "lock.released" && m.resource === resource), RESOURCE, { timeout: STEP_MS });
    assert.equal((await released.jsonValue()).reason, "forced");
    assert.deepEqual(await roomRow().locator("td").allInnerTexts(), [ROOM, "1", "0"]);
  });

  it("finds the lock_forced audit record naming the admin as the actor", async () => {
    await admin.click("#tabs button[data-tab=audit]");
    const form = admin.locator("#auditform");
    await form.locator("input[name=room]").fill(ROOM);
    await form.locator("input[name=actor]").fill("admin");
    await form.locator("select[name=kind]").selectOption("lock_forced");
    await form.locator("button[type=submit]").click();
    const rec = admin.locator("tr.record[data-kind=lock_forced]");
    await rec.first().waitFor();
    assert.equal(await rec.count(), 1);
    const cells = await rec.first().locator("td").allInnerTexts();
    assert.equal(cells[2], ROOM);
    assert.equal(cells[3], RESOURCE);
    assert.equal(cells[4], `carol-${ID}`);
    assert.equal(cells[5], "admin (admin_token)");
    // The same room without filters pages back through its whole trail (acquired, forced, ...).
    await form.locator("input[name=actor]").fill("");
    await form.locator("select[name=kind]").selectOption("");
    await form.locator("select[name=limit]").selectOption("25");
    await form.locator("button[type=submit]").click();
    await admin.locator("tr.record[data-kind=lock_acquired]").first().waitFor();
    await admin.screenshot({ path: join(SHOTS, "admin-audit.png"), fullPage: true });
  });

  it("lists this node with its sessions", async () => {
    await admin.click("#tabs button[data-tab=nodes]");
    const row = admin.locator("tr.node").first();
    await row.waitFor();
    const cells = await row.locator("td").allInnerTexts();
    assert.match(cells[0], /\(answered\)/);
    assert.ok(Number(cells[1]) >= 1, `attached sessions: ${cells[1]}`);
    assert.equal(cells[4], "serving");
    await admin.screenshot({ path: join(SHOTS, "admin-nodes.png"), fullPage: true });
  });

  it("an owner's token sees the rooms it owns and their audit, not the nodes", async () => {
    await admin.click("#signout");
    await admin.locator("#login").waitFor();
    assert.equal(await admin.evaluate(() => sessionStorage.getItem("lockstep.admin.token")), null);
    await admin.fill("#token", await devToken(`olive-${ID}`, "Olive", { [ROOM]: "owner", "*": "viewer" }));
    await admin.click("#loginform button[type=submit]");
    // Signing in keeps the tab in the address (#nodes here): go back to the rooms.
    await admin.locator("#tabs").waitFor();
    await admin.click("#tabs button[data-tab=rooms]");
    await roomRow().waitFor();
    assert.match(await admin.locator("#who").innerText(), /Olive/);
    assert.equal(await admin.locator("tr.detailrow:not([hidden])").count(), 0, "the admin's open room stayed open");
    assert.deepEqual(await admin.locator("tr.room").evaluateAll((rows) => rows.map((r) => r.dataset.room)), [ROOM]);
    await admin.click("#tabs button[data-tab=audit]");
    await admin.locator("#audithint").filter({ hasText: "give a Room you own" }).waitFor();
    await admin.locator("#auditform input[name=room]").fill(ROOM);
    await admin.locator("#auditform select[name=kind]").selectOption("lock_forced");
    await admin.locator("#auditform button[type=submit]").click();
    await admin.locator("tr.record[data-kind=lock_forced]").waitFor();
    await admin.click("#tabs button[data-tab=nodes]");
    await admin.locator("#noderows").filter({ hasText: "needs the admin token" }).waitFor();
  });

  it("had no page errors", () => {
    // The refused requests (the bad token's 401, the owner's 403s) are logged by Chromium as
    // failed resource loads; they are the expected answers.
    const real = problems.filter((p) => !/status of 40[13]/.test(p));
    assert.deepEqual(real, []);
  });
});
