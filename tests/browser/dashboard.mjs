// Loads the cloud's dashboard in headless Chromium and reports what it shows.
//   node dashboard.mjs <dashboard url> <screenshot path>
// Prints one JSON line after the first snapshot is rendered, then waits for a line on stdin
// ("next"), waits until the page shows a newer snapshot, prints a second JSON line, saves a
// screenshot and exits. The Rust test compares the lines with the API.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";

const [url, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  const read = () => page.evaluate(() => ({
    updates: Number(document.body.dataset.updates || 0),
    status: document.querySelector("#status").textContent,
    lines: [...document.querySelectorAll("#oee tbody tr")].map(tr => ({
      line: tr.dataset.line,
      oee: tr.querySelector(".oee").textContent,
      parts: Number(tr.querySelector(".parts").textContent),
    })),
    pareto_rows: document.querySelectorAll("#pareto tbody tr").length,
    production_bars: document.querySelectorAll("#production rect").length,
  }));
  await page.goto(url);
  await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 1, null, { timeout: 60000 });
  const first = await read();
  console.log(JSON.stringify(first));
  const rl = createInterface({ input: process.stdin });
  for await (const _ of rl) break;
  await page.waitForFunction(n => Number(document.body.dataset.updates || 0) > n, first.updates, { timeout: 60000 });
  console.log(JSON.stringify(await read()));
  await page.screenshot({ path: shot, fullPage: true });
} finally {
  await browser.close();
}
