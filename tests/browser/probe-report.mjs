// Opens the probe's HTML report (a local file) in headless Chromium, as IT would open an
// attachment: writes OUTFILE.json ({text, requests, badges: [{verdict, text, rgb}], svgs}) and
// OUTFILE.png (a full-page screenshot, from which each verdict badge's colour is read).
// Usage: node probe-report.mjs REPORT.html OUTFILE
import { chromium } from 'playwright-core';
import { PNG } from 'pngjs';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [file, out] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'turnpike-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 1200, height: 900 },
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
try {
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  await page.goto(pathToFileURL(resolve(file)).href);
  const text = await page.evaluate(() => document.body.innerText);
  const svgs = await page.$$eval('svg', (els) => els.map((e) => e.querySelectorAll('rect').length));
  const shot = await page.screenshot({ fullPage: true });
  writeFileSync(`${out}.png`, shot);
  const png = PNG.sync.read(shot);
  const boxes = await page.$$eval('#firewall tr[data-verdict] .v', (els) => els.map((e) => {
    const r = e.getBoundingClientRect();
    return { verdict: e.closest('tr').dataset.verdict, text: e.textContent,
      // The badge's left padding: its colour, not its text's.
      x: r.x + 2 + window.scrollX, y: r.y + r.height / 2 + window.scrollY };
  }));
  const badges = boxes.map((b) => {
    const i = (Math.round(b.y) * png.width + Math.round(b.x)) * 4;
    return { verdict: b.verdict, text: b.text, rgb: [png.data[i], png.data[i + 1], png.data[i + 2]] };
  });
  writeFileSync(`${out}.json`, JSON.stringify({ text, requests, badges, svgs }));
  console.log(`${out}: done`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
