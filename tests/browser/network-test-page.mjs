// Opens the relay's network test page in headless Chromium (fake camera and microphone), waits
// for the finished report, downloads it with the page's button, takes a screenshot and reads
// the colour of each verdict badge from it. Writes OUTFILE.json (and OUTFILE.png):
// {report, downloaded, requests, badges: [{verdict, text, rgb}]}.
// Usage: node network-test-page.mjs URL OUTFILE
import { chromium } from 'playwright-core';
import { PNG } from 'pngjs';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const [url, out] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'turnpike-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  acceptDownloads: true,
  viewport: { width: 1100, height: 900 },
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--ignore-certificate-errors',
    '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  ],
});
try {
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  const console_ = [];
  page.on('console', (m) => console_.push(`${m.type()}: ${m.text()}`));
  // A network change just after the namespace came up aborts a load: try again, bounded.
  for (let attempt = 1; ; attempt++) {
    try {
      await page.goto(url);
      break;
    } catch (e) {
      if (attempt >= 5 || !String(e).includes('ERR_NETWORK_CHANGED')) throw e;
      await new Promise((r) => setTimeout(r, 500));
    }
  }
  await page.waitForFunction(() => window.turnpikeReport && window.turnpikeReport.done, null, { timeout: 150000 });
  // The speaker test, as a visitor who heard the tone answers it.
  await page.click('#tone');
  await page.click('#heard');
  const report = await page.evaluate(() => window.turnpikeReport);
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#download')]);
  const downloaded = JSON.parse(readFileSync(await download.path(), 'utf8'));
  const shot = await page.screenshot({ fullPage: true });
  writeFileSync(`${out}.png`, shot);
  const png = PNG.sync.read(shot);
  const boxes = await page.$$eval('.badge', (els) => els.map((e) => {
    const r = e.getBoundingClientRect();
    return { verdict: e.parentElement.dataset.verdict, text: e.textContent,
      // Centre column, in the top padding: the badge's colour, not its text's.
      x: r.x + r.width / 2 + window.scrollX, y: r.y + 2 + window.scrollY };
  }));
  const badges = boxes.map((b) => {
    const i = (Math.round(b.y) * png.width + Math.round(b.x)) * 4;
    return { verdict: b.verdict, text: b.text, rgb: [png.data[i], png.data[i + 1], png.data[i + 2]] };
  });
  writeFileSync(`${out}.json`, JSON.stringify({ report, downloaded, requests, badges, console: console_ }));
  console.log(`${out}: done, verdict ${report.verdict}`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
