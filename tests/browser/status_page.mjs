// Opens a node's status page in Debian's chromium, checks it shows the
// node's live state, writes a key through the API and waits for the open
// page to show it without a reload, then saves a screenshot.
//   node status_page.mjs NODE_URL SCREENSHOT.png
// Prints one JSON line with what it saw; exits non-zero on any failure.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [url, shot] = process.argv.slice(2);
if (!url || !shot) {
  console.error("usage: node status_page.mjs NODE_URL SCREENSHOT.png");
  process.exit(2);
}
const profile = mkdtempSync(join(tmpdir(), "capy-chromium-"));
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  viewport: { width: 1400, height: 1000 },
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const fail = async (msg) => {
  console.error("FAIL: " + msg);
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
  process.exit(1);
};
try {
  const page = browser.pages()[0] || await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  const external = [];
  page.on("request", (r) => { if (!r.url().startsWith(url)) external.push(r.url()); });

  await page.goto(url + "/", { waitUntil: "load" });
  await page.waitForFunction(() => document.getElementById("node-name")?.textContent?.length > 1, null, { timeout: 15000 });
  const text = async (id) => (await page.textContent("#" + id))?.trim();
  const before = { name: await text("node-name"), keys: Number(await text("store-keys")), puts: Number(await text("puts")) };
  const sections = await page.$$eval("section h2", (hs) => hs.map((h) => h.firstChild.textContent.trim()));
  const vnodeRows = await page.$$eval("#vnodes tr", (r) => r.length - 1);
  const peerRows = await page.$$eval("#peers tr", (r) => r.length - 1);
  const leafRows = await page.$$eval("#leaf tr", (r) => r.length - 1);

  // A write through this node's API: the open page must pick it up by itself.
  const key = "status-page-" + Date.now();
  const r = await fetch(`${url}/api/kv/${key}`, { method: "PUT", body: "x".repeat(1000) });
  if (!r.ok) await fail(`put answered ${r.status}: ${await r.text()}`);
  await page.waitForFunction((p) => Number(document.getElementById("puts")?.textContent) > p, before.puts, { timeout: 15000 })
    .catch(() => fail("the page did not show the put within 15 s"));
  await page.waitForFunction((k) => Number(document.getElementById("store-keys")?.textContent) > k, before.keys, { timeout: 15000 })
    .catch(() => fail("the page did not show the new key within 15 s"));
  const after = { keys: Number(await text("store-keys")), puts: Number(await text("puts")), bytes: await text("store-bytes") };
  await page.screenshot({ path: shot, fullPage: true });
  if (errors.length) await fail("script errors on the page: " + errors.join("; "));
  if (external.length) await fail("the page loaded something from elsewhere: " + external.join(", "));
  console.log(JSON.stringify({ before, after, sections, vnodeRows, peerRows, leafRows, screenshot: shot }));
} catch (e) {
  await fail(String(e && e.stack || e));
}
await browser.close();
rmSync(profile, { recursive: true, force: true });
