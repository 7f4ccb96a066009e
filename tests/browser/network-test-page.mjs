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

// MODE "clicked-through": the page's certificate accepted as a visitor who clicked through
// the browser's warning does (for the page only), instead of trusted by the whole browser.
const [url, out, mode] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), 'turnpike-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  acceptDownloads: true,
  ignoreHTTPSErrors: mode === 'clicked-through',
  viewport: { width: 1100, height: 900 },
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ...(mode === 'clicked-through' ? [] : ['--ignore-certificate-errors']),
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
  // The speaker test: no answer is taken before the tone played; then a visitor who heard it
  // answers (the click waits for the button to be enabled).
  const before = await page.evaluate(() => document.querySelector('#heard').disabled);
  await page.click('#tone');
  await page.click('#heard', { timeout: 10000 });
  const speaker = { answer_disabled_before_tone: before };
  // The page's statistics and call-quality model on fixed samples, for the test to compare
  // with the probe's.
  const model = await page.evaluate(() => [
    [[12.5, 13.1, 11.9, 40.2, 12.2, 12.8], 0],
    [[80.25, 95.5, 110.75, 70.125, 300.5], 0.05],
    [[5.5, 6.25], 0.2],
  ].map(([xs, loss]) => ({ xs, loss, stats: turnpikeModel.stats(xs), jitter: turnpikeModel.jitterOf(xs),
    voice: turnpikeModel.scoreOf(xs, loss) })));
  const report = await page.evaluate(() => window.turnpikeReport);
  const figures = await page.$$eval('#paths .figures', (els) => els.map((e) => e.textContent));
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
  writeFileSync(`${out}.json`, JSON.stringify({ report, downloaded, requests, badges, speaker, model, figures, console: console_ }));
  console.log(`${out}: done, verdict ${report.verdict}`);
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
