// Saves segmentations through OHIF's own UI in Debian's chromium (playwright-core):
// segmentation mode, hydrate the node's AI SEG or add a new segmentation, paint with
// the brush on a given slice, then segmentation ⋮ → Export → DICOM SEG → "Store
// Segmentation" → Save, which makes OHIF POST the SEG to {stowRoot}/studies.
// Selectors are OHIF's data-cy ids (its own Playwright e2e tests use them).
//
// Input: a JSON file named by argv[2]:
//   url, token, chromium, userDataDir, timeoutMs,
//   cases: [{ name, studyUid, aiSegSeriesUid (hydrate it) | newSegmentLabel (add one),
//             segmentLabel (the segment to paint), sliceSopUid, brush: { row, col,
//             radiusMm, dragPx }, appConfig (text served as /app-config.js, or null),
//             shotsDir }]
// Output: one JSON line on stdout: { cases: { name: result } } (or { fatal }).
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium, selectors } = require('playwright-core');

const FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
  '--no-first-run', '--disable-background-networking', '--disable-component-update',
  '--disable-sync', '--disable-dev-shm-usage'];

async function signIn(page, opt) {
  if (new URL(page.url()).pathname !== '/login') return false;
  await page.fill('input[name=token]', opt.token);
  await Promise.all([page.waitForURL(u => u.pathname !== '/login', { timeout: 30000 }),
    page.click('button[type=submit]')]);
  return true;
}

async function clickIfShown(page, testId, timeout) {
  const el = page.getByTestId(testId);
  try {
    await el.first().waitFor({ timeout });
  } catch (e) {
    return false;
  }
  await el.first().click();
  return true;
}

// The viewport's current slice: its index, SOP Instance UID and the number of slices.
function currentSlice(page) {
  return page.evaluate(() => {
    const vp = window.cornerstone.getEnabledElements()[0].viewport;
    const imageId = vp.getCurrentImageId();
    const m = /\/instances\/([^/]+)\//.exec(imageId);
    return { index: vp.getCurrentImageIdIndex(), sop: m && m[1], count: vp.getImageIds().length,
      imageIds: vp.getImageIds().map(id => (/\/instances\/([^/]+)\//.exec(id) || [])[1]) };
  });
}

// Scroll the viewport with the mouse wheel (OHIF's stack scroll) until sopUid shows.
async function goToSlice(page, sopUid, out) {
  const grid = await page.getByTestId('viewport-grid').boundingBox();
  await page.mouse.move(grid.x + grid.width / 2, grid.y + grid.height / 2);
  for (let i = 0; i < 200; i++) {
    const now = await currentSlice(page);
    const target = now.imageIds.indexOf(sopUid);
    if (target < 0) throw new Error(`slice ${sopUid} is not in the viewport`);
    if (now.index === target) {
      out.steps.push(`on slice ${target + 1}/${now.count}`);
      return now;
    }
    await page.mouse.wheel(0, target > now.index ? 100 : -100);
    await page.waitForTimeout(150);
  }
  throw new Error('could not scroll to the slice');
}

// Page coordinates of pixel (col, row) of the slice shown, through cornerstone's
// image -> world -> canvas transforms.
function pagePoint(page, col, row) {
  return page.evaluate(({ col, row }) => {
    const cs = window.cornerstone;
    const vp = cs.getEnabledElements()[0].viewport;
    const imageId = vp.getCurrentImageId();
    const world = cs.utilities.imageToWorldCoords(imageId, [col, row]);
    const c = vp.worldToCanvas(world);
    const r = vp.canvas.getBoundingClientRect();
    const back = cs.utilities.worldToImageCoords(imageId, vp.canvasToWorld(c));
    return { x: r.x + c[0], y: r.y + c[1], world, pixel: back };
  }, { col, row });
}

async function paint(page, c, out) {
  const radius = page.locator('div[data-cy="brush-radius"] input');
  await radius.fill(String(c.brush.radiusMm));
  await radius.press('Enter');
  out.brushRadiusShown = await radius.inputValue();
  const { row, col, dragPx } = c.brush;
  const from = await pagePoint(page, col - dragPx, row);
  const to = await pagePoint(page, col + dragPx, row);
  out.brushStroke = { from, to };
  await page.mouse.move(from.x, from.y);
  await page.mouse.down();
  await page.mouse.move(to.x, to.y, { steps: 8 });
  await page.mouse.up();
  out.steps.push('painted');
}

// Segmentation ⋮ → Export → DICOM SEG. Export is a Radix submenu that opens on
// hover; on a busy machine it may miss the first hover, so also try the keyboard
// (ArrowRight opens a submenu) and, failing that, reopen the menu.
async function openStoreDialog(page, out) {
  // The store dialog, opened from ⋮ → Export → DICOM SEG; a click the menu swallowed
  // (it closed as the submenu opened) is tried again rather than waited on.
  const seg = page.getByText('DICOM SEG', { exact: true });
  const dialog = page.locator('[role=dialog]').filter({ hasText: 'Store Segmentation' });
  for (let attempt = 1; attempt <= 4; attempt++) {
    await page.locator('[data-cy^="segmentation-collapsed-more-btn"]').first().click();
    const exportItem = page.getByRole('menuitem').filter({ hasText: 'Export' }).first();
    await exportItem.hover();
    await exportItem.click();
    if (!await seg.isVisible()) await exportItem.press('ArrowRight').catch(() => {});
    try {
      await seg.waitFor({ timeout: 5000 });
      await seg.click();
    } catch (e) {
      out.steps.push(`export submenu did not open (try ${attempt})`);
      await page.keyboard.press('Escape');
      await page.keyboard.press('Escape');
      continue;
    }
    try {
      await dialog.waitFor({ timeout: 10000 });
      return dialog;
    } catch (e) {
      out.steps.push(`store dialog did not open (try ${attempt})`);
      await page.keyboard.press('Escape');
      await page.keyboard.press('Escape');
    }
  }
  throw new Error('the store dialog never opened (⋮ → Export → DICOM SEG)');
}

async function runCase(ctx, opt, c) {
  const out = { steps: [], consoleErrors: [], dicomwebErrors: [] };
  const page = await ctx.newPage();
  page.on('console', m => { if (m.type() === 'error') out.consoleErrors.push(m.text().slice(0, 300)); });
  page.on('response', r => {
    if (r.url().includes('/dicomweb') && r.status() >= 400) {
      out.dicomwebErrors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
    }
  });
  if (c.appConfig) {
    await page.route(u => u.pathname === '/app-config.js', route => route.fulfill({
      status: 200, contentType: 'application/javascript', body: c.appConfig }));
  }
  const shot = async name => {
    const file = path.join(c.shotsDir, `${c.name}-${name}.png`);
    await page.screenshot({ path: file });
    out.screenshots = [...(out.screenshots || []), file];
  };
  try {
    await page.goto(`${opt.url}/segmentation?StudyInstanceUIDs=${c.studyUid}`,
      { waitUntil: 'domcontentloaded' });
    if (await signIn(page, opt)) out.steps.push('signed in');
    await page.getByTestId('viewport-grid').waitFor({ state: 'attached', timeout: opt.timeoutMs });
    await page.getByTestId('study-browser-thumbnail-no-image').first()
      .waitFor({ timeout: opt.timeoutMs });
    if (await clickIfShown(page, 'confirm-and-hide-button', 3000)) out.steps.push('notice hidden');
    out.storeMode = await page.evaluate(
      () => window.services.customizationService.getCustomization('segmentation.store.defaultMode'));
    await page.getByTestId('panelSegmentationWithToolsLabelMap-btn').click();
    if (c.aiSegSeriesUid) {
      // The AI SEG's thumbnail (the only SEG of the study): load it, then hydrate.
      await page.getByTestId('study-browser-thumbnail-no-image').first().dblclick();
      await page.getByTestId('yes-hydrate-btn').click({ timeout: opt.timeoutMs });
      out.steps.push('hydrated');
      await page.getByTestId('data-row').filter({ hasText: c.segmentLabel }).first()
        .waitFor({ timeout: opt.timeoutMs });
    } else {
      await page.getByTestId('addSegmentation').click();
      const row = page.getByTestId('data-row').first();
      await row.waitFor({ timeout: opt.timeoutMs });
      await row.getByTestId('actionsMenuTrigger').click();
      await page.getByTestId('Rename').click();
      await page.getByTestId('dialog-input').fill(c.newSegmentLabel);
      await page.getByTestId('input-dialog-save-button').click();
      await page.getByTestId('data-row').filter({ hasText: c.newSegmentLabel }).first()
        .waitFor({ timeout: 10000 });
      out.steps.push(`added segment ${c.newSegmentLabel}`);
    }
    await goToSlice(page, c.sliceSopUid, out);
    await page.getByTestId('data-row').filter({ hasText: c.segmentLabel }).first().click();
    // Selecting a segment may jump to it: come back to the slice to paint.
    const { index, sop, count } = await goToSlice(page, c.sliceSopUid, out);
    out.slice = { index, sop, count };
    await page.getByTestId('Brush-btn').click();
    await page.waitForTimeout(300);
    await shot('before-brush');
    await paint(page, c, out);
    await page.waitForTimeout(800);
    const after = await currentSlice(page);
    out.paintedSop = after.sop;
    await shot('after-brush');

    // segmentation ⋮ → Export → DICOM SEG → "Store Segmentation" → Save
    const dialog = await openStoreDialog(page, out);
    out.steps.push('store dialog');
    const [resp] = await Promise.all([
      page.waitForResponse(r => r.request().method() === 'POST' &&
        new URL(r.url()).pathname === '/dicomweb/studies', { timeout: opt.timeoutMs }),
      dialog.getByRole('button', { name: 'Save', exact: true }).click(),
    ]);
    out.stow = { status: resp.status(), body: await resp.text(),
      contentType: resp.request().headers()['content-type'] };
    out.steps.push('saved');
  } catch (err) {
    out.error = String(err && err.stack || err).slice(0, 2000);
    await shot('error').catch(() => {});
  } finally {
    await page.close();
  }
  return out;
}

async function main() {
  const opt = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  opt.timeoutMs = opt.timeoutMs || 120000;
  selectors.setTestIdAttribute('data-cy');
  const ctx = await chromium.launchPersistentContext(opt.userDataDir, {
    executablePath: opt.chromium || '/usr/bin/chromium', headless: true, args: FLAGS,
    viewport: { width: 1280, height: 800 },
  });
  const result = { cases: {} };
  try {
    for (const c of opt.cases) {
      const started = Date.now();
      result.cases[c.name] = await runCase(ctx, opt, c);
      result.cases[c.name].seconds = (Date.now() - started) / 1000;
    }
  } finally {
    await ctx.close();
  }
  process.stdout.write(JSON.stringify(result) + '\n');
}

main().catch(err => { process.stdout.write(JSON.stringify({ fatal: String(err && err.stack || err) }) + '\n'); process.exit(1); });
