// Drives the cloud's dashboard in headless Chromium for the Rust tests (tests/tests/main.rs).
//   node dashboard.mjs
// Reads one JSON command per line on stdin and answers each with one JSON line on stdout:
//   {"open": url, "width": 1400}       load a page (a new one) and wait until it has rendered
//   {"click": css}                      click, then wait for the page to render again
//   {"select": [css, value]}            choose an option, then wait for the next render
//   {"back": true}                      browser back, then wait for the next render
//   {"wait_updates": n}                 wait until the page has rendered more than n times
//   {"wait": js}                        wait until the expression is true in the page
//   {"shot": path}                      save a full-page screenshot
// Any command may carry "expect_failures": [url parts]: HTTP errors of those URLs are expected
// from then on; any other failed request or page error is reported in "console_errors".
// Each answer is what the page shows (see `read`), or {"error": "..."}; "ms" is how long the
// command took and, for "open", "drawn_ms" the time from the start of navigation until every chart
// had drawn (both recorded by the benchmark, never asserted on).
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
// One browser profile for all pages, as a user's browser: its HTTP and compiled-code caches keep
// the charting library between pages (browser.newPage() would start each in an empty profile).
const context = await browser.newContext();
let page = null;
let drawn = null;
let expected = []; // parts of URLs whose failure a command expects ({"expect_failures": [...]})
const errors = [];

const read = () => page.evaluate(() => {
  const text = s => document.querySelector(s)?.textContent.trim() ?? null;
  const banner = document.querySelector("#banner");
  const data = window.millrace?.data() || null;
  const timeline = window.millrace?.chart("timeline")?.getOption();
  return {
    url: location.pathname + location.search,
    updates: Number(document.body.dataset.updates || 0),
    state: document.body.dataset.state || null,
    status: text("#status"),
    banner: banner.hidden ? null : { kind: banner.dataset.kind, text: banner.textContent.trim() },
    scope: text("#scope-title"),
    range: document.querySelector("#range").value,
    crumbs: [...document.querySelectorAll("#crumbs a, #crumbs span:not(.sep)")].map(e => e.textContent),
    kpis: Object.fromEntries([...document.querySelectorAll("#kpis .tile")].map(t => [t.dataset.kpi, t.querySelector(".v").textContent])),
    children: document.querySelector("#children-card").hidden ? null : [...document.querySelectorAll("#children tbody tr[data-entity]")].map(tr => ({
      entity: tr.dataset.entity,
      oee: tr.querySelector(".oee").textContent,
      availability: tr.querySelector(".availability").textContent,
      performance: tr.querySelector(".performance").textContent,
      quality: tr.querySelector(".quality").textContent,
      parts: Number(tr.querySelector(".parts").textContent),
      scrap: Number(tr.querySelector(".scrap").textContent),
      downtime_min: Number(tr.querySelector(".downtime").textContent),
    })),
    from: data?.view.from ?? null,
    to: data?.view.to ?? null,
    intervals: data?.states ?? [],
    resolution: data?.resolution ?? null,
    timeline_items: timeline ? timeline.series.reduce((n, s) => n + (s.data?.length || 0), 0) : 0,
    alert_rows: [...document.querySelectorAll("#alerts tbody tr")].filter(tr => tr.children.length === 5).map(tr => [...tr.children].map(td => td.textContent)),
    edges: [...document.querySelectorAll("#edges tbody tr[data-edge]")].map(tr => ({ edge: tr.dataset.edge, status: tr.children[1].textContent, sync: tr.querySelector(".sync").textContent, gaps: tr.querySelector(".gaps").textContent })),
    console_errors: [],
  };
});

// Rendered again since `n` renders (or failed, saying why), and no newer view is loading.
const rendered = n => page.waitForFunction(
  n => !document.body.dataset.busy && (Number(document.body.dataset.updates || 0) > n ||
    (document.body.dataset.state && document.body.dataset.state !== "ok" && !document.querySelector("#banner").hidden)),
  n, { timeout: 120000 });
const updates = () => page.evaluate(() => Number(document.body.dataset.updates || 0));

async function run(cmd) {
  if (cmd.expect_failures) expected = cmd.expect_failures;
  if (cmd.open) {
    if (page) await page.close();
    page = await context.newPage();
    await page.setViewportSize({ width: cmd.width || 1400, height: 900 });
    page.on("pageerror", e => errors.push(String(e)));
    page.on("console", m => { if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) errors.push(m.text()); });
    // Failed requests are reported with their address; those the test provokes are expected.
    page.on("response", r => { if (r.status() >= 400 && !expected.some(p => r.url().includes(p))) errors.push(`${r.status()} ${r.url()}`); });
    await page.goto(cmd.open);
    await rendered(0);
    // From the start of navigation to every chart having drawn its data (ECharts' "finished",
    // progressive rendering included): the benchmark's figure.
    drawn = null;
    if (await page.evaluate(() => document.body.dataset.state === "ok")) {
      await page.waitForFunction(() => document.body.dataset.drawn === document.body.dataset.updates, null, { timeout: 120000 });
      drawn = await page.evaluate(() => ({
        drawn_ms: Number(document.body.dataset.drawnMs),
        // the last API answer's arrival, and each panel's drawing ("panel:<name>" measures)
        answers_ms: Math.round(Math.max(...performance.getEntriesByType("resource").filter(e => e.name.includes("/api/")).map(e => e.responseEnd))),
        panels_ms: Object.fromEntries(performance.getEntriesByType("measure").filter(m => m.name.startsWith("panel:")).map(m => [m.name.slice(6), Math.round(m.duration)])),
      }));
    }
  } else if (cmd.click) {
    const n = await updates();
    await page.click(cmd.click);
    await rendered(n);
  } else if (cmd.select) {
    const n = await updates();
    await page.selectOption(cmd.select[0], cmd.select[1]);
    await rendered(n);
  } else if (cmd.back) {
    const n = await updates();
    await page.goBack();
    await rendered(n);
  } else if (cmd.wait_updates != null) {
    await rendered(cmd.wait_updates);
  } else if (cmd.wait) {
    await page.waitForFunction(cmd.wait, null, { timeout: 120000 });
    await page.waitForFunction(() => !document.body.dataset.busy, null, { timeout: 120000 });
  } else if (cmd.shot) {
    await page.screenshot({ path: cmd.shot, fullPage: true });
  }
  const out = await read();
  out.console_errors = errors.splice(0);
  if (cmd.open && drawn) Object.assign(out, drawn);
  return out;
}

try {
  for await (const line of createInterface({ input: process.stdin })) {
    if (!line.trim()) continue;
    const t0 = Date.now();
    let out;
    try {
      out = await run(JSON.parse(line));
    } catch (e) {
      out = { error: String(e) };
    }
    out.ms = Date.now() - t0;
    console.log(JSON.stringify(out));
  }
} finally {
  await browser.close();
}
