// dashboard.js: drives Debian's chromium (headless, through playwright-core) against the dashboard
// of a live kdpeers run and checks what the page shows. Prints "ok - ..." / "FAIL - ..." lines and
// exits 1 if any check failed (2 if the browser could not be driven at all).
// Usage: NODE_PATH=.cache/playwright/node_modules node tests/dashboard.js ADDR SCREENSHOT.png
//   DASH_TOKEN (environment): the run's server.token; then the page must ask for it first.
//   DASH_CHROMIUM: the browser (default /usr/bin/chromium).
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const {chromium} = require("playwright-core");

const [addr, shot] = process.argv.slice(2);
const token = process.env.DASH_TOKEN || "";
let failed = 0;
const ok = (what) => console.log("ok   - " + what);
const bad = (what) => { failed++; console.log("FAIL - " + what); };
const expect = (cond, what) => (cond ? ok(what) : bad(what));
const auth = token ? {Authorization: "Bearer " + token} : {};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function status() {
  const r = await fetch(addr + "/status", {headers: auth});
  if (!r.ok) throw new Error("/status: HTTP " + r.status);
  return r.json();
}

async function control(body) {
  const r = await fetch(addr + "/control", {method: "POST", headers: auth, body: JSON.stringify(body)});
  return r.status;
}

// the points of one series as the page's Chart.js instance holds them (null: no such chart/series)
async function seriesOf(page, chart, name) {
  return page.evaluate(([chart, name]) => {
    const canvas = document.querySelector(`[data-chart="${chart}"] canvas`);
    const c = canvas && window.Chart.getChart(canvas);
    const d = c && c.data.datasets.find((x) => x.label === name);
    return d ? d.data.map((p) => [p.x, p.y]) : null;
  }, [chart, name]);
}

async function waitFor(what, fn, seconds) {
  const until = Date.now() + seconds * 1000;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error("timed out waiting for " + what);
    await sleep(200);
  }
}

async function main() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "kdp-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.DASH_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: {width: 1400, height: 1000},
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  const problems = [], urls = [];
  let historyWithAuth = 0, historyNoAuth = 0, historyRequests = 0;
  // Chromium logs each refused request (the 401s of the token form) as a console error: those
  // are counted apart, everything else is a problem
  let refused = 0;
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    if (/status of 401/.test(m.text())) refused++;
    else problems.push("console: " + m.text());
  });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("request", (r) => {
    urls.push(r.url());
    if (new URL(r.url()).pathname === "/history") {
      historyRequests++;
      const a = r.headers()["authorization"];
      if (a === "Bearer " + token) historyWithAuth++;
      else if (a === undefined) historyNoAuth++;
    }
  });
  try {
    await page.goto(addr + "/", {waitUntil: "load"});
    if (token) {
      await page.locator("#token-form").waitFor({state: "visible", timeout: 15000});
      ok("with server.token set, the page asks for the token");
      expect((await page.locator("[data-chart] canvas").count()) === 0,
             "  ...and shows no curves before it is entered");
      await page.fill("#token-input", "wrong-" + token);
      await page.click("#token-form button[type=submit]");
      await page.locator("#token-error").waitFor({state: "visible", timeout: 15000});
      ok("  a wrong token is refused on the page (the form comes back saying so)");
      await page.fill("#token-input", token);
      await page.click("#token-form button[type=submit]");
    }
    await page.locator('[data-chart="train_loss"] canvas').waitFor({state: "visible", timeout: 30000});
    ok("the training-loss curves appear" + (token ? " once the token is entered" : ""));
    expect(await page.locator("#token-form").isHidden(), "  ...and the token form is gone");
    const first = await waitFor("a train_loss point", async () => {
      const s = await seriesOf(page, "train_loss", "peer0");
      return s && s.length ? s : null;
    }, 30);
    const grown = await waitFor("the curves to update", async () => {
      const s = await seriesOf(page, "train_loss", "peer0");
      return s && s.length > first.length ? s : null;
    }, 30);
    ok(`the curves update by themselves (train loss of peer0: ${first.length} -> ${grown.length} points)`);
    const st0 = await status();
    const peers = st0.config.peers;
    await waitFor("an evaluation on the page", async () => {
      const s = await seriesOf(page, "test_accuracy", "ensemble");
      return s && s.length >= 2 ? s : null;
    }, 60);
    ok("test accuracy curves appear after two evaluations");

    // freeze the run, then what the page plots must equal what /status says
    expect((await control({action: "pause"})) === 202, "POST /control pause (202)");
    const st = await waitFor("/status to say paused", async () => {
      const s = await status();
      return s.progress.paused ? s : null;
    }, 30);
    const polls0 = await page.evaluate(() => window.kdpeersDashboard.polls);
    await waitFor("two more polls of the page", async () =>
      (await page.evaluate(() => window.kdpeersDashboard.polls)) >= polls0 + 2, 20);
    for (const [model, ev] of Object.entries(st.eval)) {
      const s = await seriesOf(page, "test_accuracy", model);
      const last = s && s[s.length - 1];
      expect(last && last[1] === ev.acc,
             `the last test accuracy point of ${model} on the page (${last && last[1]}) equals /status's (${ev.acc})`);
    }
    for (let p = 0; p < peers; p++) {
      const s = await seriesOf(page, "train_loss", "peer" + p);
      const last = s && s[s.length - 1];
      const want = st.peers[p].ce;
      expect(last && Math.abs(last[1] - want) <= 1e-5 * Math.abs(want),
             `the last training loss point of peer${p} (${last && last[1]}) equals /status's ce (${want}) to 6 digits`);
    }
    const progress = await page.textContent("#progress-text");
    expect(progress.includes(`step ${st.progress.step} / ${st.progress.total_steps}`),
           `the page shows /status's step (${progress.trim()})`);
    expect((await page.textContent("#state")).trim() === "paused", "the state badge says paused");
    const method = await page.textContent("#config");
    expect(method.includes(st.config.method) && method.includes(st.config.dir),
           "the configuration table shows the method and run.dir");
    const events = await page.textContent("#events");
    expect(events.includes("pause"), "the events list shows the pause command");
    for (const id of ["learning_rate", "throughput", "time_split", "train_accuracy", "test_loss"]) {
      const visible = await page.locator(`[data-chart="${id}"]`).isVisible();
      expect(visible, `the ${id} chart is shown`);
    }
    const split = await page.evaluate(() => {
      const c = window.Chart.getChart(document.querySelector('[data-chart="time_split"] canvas'));
      return c.data.datasets.map((d) => d.label);
    });
    expect(["compute", "exchange", "allreduce", "wait"].every((n) => split.includes(n)),
           `the time split has compute, exchange, allreduce and wait (${split.join(", ")})`);
    if (token) {
      expect(!urls.some((u) => u.includes(token)), `the token appears in no URL the page requested (${urls.length} requests)`);
      // the first request has no token (401: the form), one has the wrong one, all others the token
      expect(historyWithAuth >= 2 && historyNoAuth === 1 && historyWithAuth + historyNoAuth + 1 === historyRequests,
             `/history requests carry the token in the Authorization header (${historyWithAuth} of ${historyRequests}; ${historyNoAuth} without)`);
      const stored = await page.evaluate(() => sessionStorage.getItem("kdpeers.token"));
      expect(stored === token, "the token is kept in the tab's sessionStorage");
      const cookies = await ctx.cookies();
      expect(cookies.length === 0, "no cookie is set");
    }
    expect(refused === (token ? 2 : 0), `401 answers: ${refused} (the first request and the wrong token)`);
    expect(problems.length === 0, "no console errors, page errors or CSP violations" +
           (problems.length ? ": " + problems.slice(0, 3).join(" | ") : ""));
    if (shot) {
      await page.evaluate(() => window.scrollTo(0, 0));
      await sleep(300);
      await page.screenshot({path: shot, fullPage: true});
      ok("screenshot written to " + shot);
    }
    expect((await control({action: "resume"})) === 202, "POST /control resume (202)");
  } catch (e) {
    bad("browser test: " + e.message);
    if (shot) await page.screenshot({path: shot, fullPage: true}).catch(() => {});
  } finally {
    await ctx.close();
    fs.rmSync(profile, {recursive: true, force: true});
  }
}

main().then(() => process.exit(failed ? 1 : 0), (e) => {
  console.log("FAIL - cannot drive the browser: " + e.message);
  process.exit(2);
});
