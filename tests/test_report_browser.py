"""report.html in a real browser: the grid's labels are readable and every image loads.

Drives Debian's chromium (`apt-get install -y chromium`, or $DUGE_CHROMIUM) through the `playwright`
Python package's `executable_path` — never `playwright install`. Without that browser the test is
skipped and says why. The page's screenshot goes to test-artifacts/report.png.

By default the report is built from the demo's prompts with random images in the grid; with
DUGE_REPORT_DIR set to a `duge demo` output folder the test checks that folder's report.html
instead (README's picture, docs/report.png, is a crop of that screenshot).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("DUGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MIN_LABEL_PX = 12

# In the page: each <img>'s load state, and for the before/after grid (decoded by the browser) the
# label column — the columns left of the first one that the image cells fill — and the height of
# its tallest line of ink, in image pixels and as displayed.
MEASURE_JS = """() => {
  const images = [...document.images].map((img) => ({alt: img.alt, complete: img.complete,
                                                    width: img.naturalWidth, height: img.naturalHeight}));
  const img = [...document.images].find((i) => i.alt === 'before_after.png');
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const ctx = canvas.getContext('2d');
  ctx.drawImage(img, 0, 0);
  const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
  const dark = (x, y) => { const i = 4 * (y * canvas.width + x); return data[i] + data[i + 1] + data[i + 2] < 384; };
  const white = (x, y) => { const i = 4 * (y * canvas.width + x); return data[i] > 250 && data[i + 1] > 250 && data[i + 2] > 250; };
  let columnEnd = 0;  // first x whose pixels are mostly not white: the image cells begin
  for (let x = 0; x < canvas.width; x++) {
    let filled = 0;
    for (let y = 0; y < canvas.height; y++) if (!white(x, y)) filled++;
    if (filled > 0.5 * canvas.height) { columnEnd = x; break; }
  }
  let inkRight = 0, tallest = 0, run = 0;
  for (let y = 0; y < canvas.height; y++) {
    let ink = false;
    for (let x = 0; x < columnEnd; x++) if (dark(x, y)) { ink = true; inkRight = Math.max(inkRight, x); }
    run = ink ? run + 1 : 0;
    tallest = Math.max(tallest, run);
  }
  const scale = img.getBoundingClientRect().height / img.naturalHeight;
  return {images, columnEnd, inkRight, tallestLine: tallest, displayedLine: tallest * scale, scale};
}"""


def _launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)


def _demo_like_report_folder(folder: Path) -> Path:
    """A `duge unlearn` folder as the demo writes it: its grid of the measured prompts the demo shows (random
    images stand in for the measurements'), report.json with three requests and the unedited model's values."""
    from duge.concepts import example_concept_set_path, load_concept_set, resolve_request
    from duge.evaluation import shown_prompts, world_measured_concepts
    from duge.run import measured_grid

    demo = load_concept_set(example_concept_set_path("demo"))
    targets, preserved = shown_prompts([resolve_request(r, builtin_world=True) for r in demo.requests],
                                       world_measured_concepts())
    generator = torch.Generator().manual_seed(0)
    shown = {p: torch.rand(4, 3, 32, 32, generator=generator) for p in targets + preserved}
    measured_grid(shown, shown, targets, preserved).save(folder / "before_after.png")
    report = {"model": "builtin", "concept_set": "demo", "method": "duge", "setting": "sequential",
              "config": {"steps": 150}, "seconds_total": 120.0, "peak_memory_mb": 540.0,
              "before": {"UA": 0.02, "IRA": 0.929, "CRA": 0.936},
              "requests": [{"target": t, "seconds": 30.0, "steps": 150, "UA": ua, "IRA": ira, "CRA": cra}
                           for t, ua, ira, cra in [("circle", 0.958, 0.94, 0.95), ("red", 0.958, 0.93, 0.96),
                                                   ("striped", 0.931, 0.951, 0.957)]],
              "final": {"UA": 0.931, "IRA": 0.951, "CRA": 0.957}}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_report_labels_are_readable_and_every_image_loads_in_chromium(tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"needs Debian's chromium at {CHROMIUM}: apt-get install -y chromium (or set DUGE_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package "
                                   "(pip install -e '.[dev]'; never `playwright install`)")
    from duge.report import write_report

    real = os.environ.get("DUGE_REPORT_DIR")
    page_path = Path(real) / "report.html" if real else write_report(_demo_like_report_folder(tmp_path))
    with sync_api.sync_playwright() as playwright:
        browser = _launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_path.as_uri(), wait_until="load")
            measured = page.evaluate(MEASURE_JS)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            panels = page.locator("svg[aria-label]").count()
        finally:
            browser.close()
    assert measured["images"], "the report embeds no image"
    for image in measured["images"]:
        assert image["complete"] and image["width"] > 0, f"image {image['alt']} did not load: {image}"
    assert measured["displayedLine"] >= MIN_LABEL_PX, measured
    # No empty label column: the labels' ink reaches to within two paddings of where the cells begin.
    assert 0 < measured["columnEnd"] - measured["inkRight"] <= 24, measured
    assert panels == 3  # UA, IRA, CRA: one panel each


def test_metric_panel_scales_to_its_values_and_marks_the_unedited_model():
    from duge.report import _metric_panel

    svg = _metric_panel("IRA", [0.94, 0.93, 0.951], 0.929)
    assert "unedited 0.929" in svg and 'stroke-dasharray' in svg
    assert ">0.00<" not in svg and ">1.00<" not in svg  # the axis spans about 0.90–0.96, not 0–1
    assert _metric_panel("UA", [None, None], 0.02) == ""
    flat = _metric_panel("CRA", [0.95], None)
    assert "unedited" not in flat and ">0.950<" in flat
