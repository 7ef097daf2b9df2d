// Opens a study and its SEG in OHIF with Debian's chromium, driven by playwright-core.
// Input: a JSON file named by argv[2] (url, token, studyUid, segSeriesUid, labels,
// screenshot, userDataDir, optional stowPart10File). Output: one JSON line on stdout.
'use strict';
const fs = require('fs');
const { chromium } = require('playwright-core');

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
  '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-dev-shm-usage'];

async function main() {
  const opt = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const out = { consoleErrors: [], dicomwebErrors: [], failedRequests: [], labelsFound: [],
    steps: [] };
  const ctx = await chromium.launchPersistentContext(opt.userDataDir, {
    executablePath: opt.chromium || '/usr/bin/chromium', headless: true, args: FLAGS,
    viewport: { width: 1280, height: 800 },
  });
  try {
    const page = ctx.pages()[0] || (await ctx.newPage());
    page.on('console', m => { if (m.type() === 'error') out.consoleErrors.push(m.text().slice(0, 500)); });
    page.on('response', r => {
      if (r.url().includes('/dicomweb') && r.status() >= 400) {
        out.dicomwebErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
      }
    });
    page.on('requestfailed', r => {
      if (r.url().includes('/dicomweb')) out.failedRequests.push(`${r.failure()?.errorText} ${r.url()}`);
    });
    const viewer = `${opt.url}/viewer?StudyInstanceUIDs=${opt.studyUid}` +
      (opt.segSeriesUid ? `&initialSeriesInstanceUID=${opt.segSeriesUid}` : '');
    await page.goto(viewer, { waitUntil: 'domcontentloaded' });
    out.steps.push(`landed ${new URL(page.url()).pathname}`);
    if (new URL(page.url()).pathname === '/login') {
      await page.fill('input[name=token]', opt.token);
      await Promise.all([page.waitForURL(u => u.pathname === '/viewer', { timeout: 30000 }),
        page.click('button[type=submit]')]);
      out.steps.push('signed in');
    }
    // OHIF may ask before it loads a SEG into the viewport ("hydrate"): say yes.
    const deadline = Date.now() + (opt.timeoutMs || 60000);
    const pending = new Set(opt.labels);
    let lastPanelTry = 0;
    while (pending.size && Date.now() < deadline) {
      // First-visit tour and notice cover the viewport; then the SEG prompt.
      for (const name of ['Skip all', 'Confirm and hide', 'Yes', 'LOAD']) {
        const btn = page.getByText(name, { exact: true });
        if (await btn.count() && await btn.first().isVisible()) {
          await btn.first().click({ timeout: 2000 }).catch(() => {});
          out.steps.push(`clicked ${name}`);
          await page.waitForTimeout(300);
        }
      }
      // The segment list lives in the right panel's segmentation tab. On a slow machine a
      // late tour or a second LOAD prompt can collapse the panel again, so keep trying
      // (at most every 5 s) until a label shows.
      const hydrated = out.steps.some(s => s === 'clicked Yes' || s === 'clicked LOAD');
      if (hydrated && out.labelsFound.length === 0 && Date.now() - lastPanelTry > 5000) {
        lastPanelTry = Date.now();
        const tab = page.locator('[data-cy^="panelSegmentation"][data-cy$="-btn"]');
        const header = page.locator('[data-cy="side-panel-header-right"]');
        if (await tab.count() && await tab.first().isVisible()) {
          await tab.first().click({ timeout: 2000 }).catch(() => {});
          out.steps.push('opened segmentation panel');
        } else if (await header.count()) {
          await header.first().click({ timeout: 2000 }).catch(() => {});
          out.steps.push('expanded right panel');
        }
        await page.waitForTimeout(500);
      }
      for (const label of [...pending]) {
        const hit = page.getByText(label, { exact: true });
        if (await hit.count() && await hit.first().isVisible()) {
          pending.delete(label);
          out.labelsFound.push(label);
        }
      }
      await page.waitForTimeout(500);
    }
    await page.waitForTimeout(3000);  // let the overlay finish drawing
    await page.screenshot({ path: opt.screenshot });
    out.title = await page.title();
    if (opt.stowPart10File) {
      // The request OHIF's data source makes when a segmentation is saved
      // (dicomweb-client storeInstances), sent from the page with its credentials.
      out.stow = await page.evaluate(async ({ b64 }) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const boundary = 'DICOMwebBoundary' + Math.random().toString(16).slice(2);
        const enc = new TextEncoder();
        const head = enc.encode(`\r\n--${boundary}\r\nContent-Type: application/dicom\r\n\r\n`);
        const tail = enc.encode(`\r\n--${boundary}--`);
        const body = new Uint8Array(head.length + bytes.length + tail.length);
        body.set(head, 0); body.set(bytes, head.length); body.set(tail, head.length + bytes.length);
        const cfg = window.config.dataSources[0].configuration;
        const resp = await fetch(`${cfg.stowRoot}/studies`, {
          method: 'POST', body,
          headers: { 'Content-Type': `multipart/related; type="application/dicom"; boundary=${boundary}`,
            Accept: 'application/dicom+json' },
        });
        return { status: resp.status, body: await resp.text() };
      }, { b64: fs.readFileSync(opt.stowPart10File).toString('base64') });
    }
  } finally {
    await ctx.close();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch(err => { process.stdout.write(JSON.stringify({ fatal: String(err && err.stack || err) }) + '\n'); process.exit(1); });
