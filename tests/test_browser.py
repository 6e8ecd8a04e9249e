"""The ComfyUI page in a headless browser, with the pack loaded: `COMFYUI_PATH=... pytest -m comfyui`.

Needs Debian's chromium (`apt-get install -y chromium`) and the `playwright` Python package
(`pip install playwright`). Never run `playwright install`: it downloads browsers; the test drives
the system's /usr/bin/chromium (or $DUGE_CHROMIUM) through `executable_path`.

Checks that the example workflows load with no missing node type, that the frontend converts the
demo to exactly its API twin, that the extension `duge.unlearning` is registered and does what it
says (the concept-set hint; after a real run, DUGE Unlearn shows what was erased and a click on
one of Attention Probe's heatmaps enlarges it), and that no console error comes from the pack.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy").is_dir():
    pytest.skip("needs a ComfyUI checkout: set COMFYUI_PATH to its folder (and run with -m comfyui)",
                allow_module_level=True)
CHROMIUM = os.environ.get("DUGE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip("needs Debian's chromium: apt-get install -y chromium (or set DUGE_CHROMIUM to a Chromium binary)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="needs the playwright Python package: pip install playwright "
                                      "(do not run `playwright install`; the system chromium is used)")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # helper modules beside the tests

from comfyui_server import PACK_NAME, ComfyServer  # noqa: E402
from workflow_format import ui_to_api  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
TEMPLATES_DIR = REPO / "example_workflows"
EXTENSION_URL = f"/extensions/{PACK_NAME}/"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SETTINGS = {
    "Comfy.TutorialCompleted": True,  # no template dialog over the canvas on a first visit
    "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw text even when zoomed out, for the screenshots
    "Comfy.Minimap.Visible": False,
}
RUN_TIMEOUT_MS = 3600 * 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(COMFYUI_PATH, tmp_path_factory.mktemp("comfyui"), settings=SETTINGS,
                     extra_args=["--cache-none"]) as running:
        yield running


# Errors of the host itself, not of the pack, that a newer frontend logs against an older server:
# frontend 1.58's queue panel asks GET /api/jobs?status=completed,failed,cancelled after every run,
# and ComfyUI 0.8.0's server knows no "cancelled" status (JobStatus.ALL) and answers 400.
HOST_VERSION_MISMATCH = (
    ("/api/jobs?", "Failed to load resource: the server responded with a status of 400"),
    ("", "[Jobs API] Error fetching jobs: JobsApiError: Failed to fetch jobs: 400"),
)


def _host_version_mismatch(entry: dict) -> bool:
    return any(url in entry["url"] and entry["text"].startswith(text) for url, text in HOST_VERSION_MISMATCH)


class Console:
    """Every console message and uncaught page error, with where it came from. `errors` leaves out
    the host's own frontend/server version mismatches above (they stay in the saved console log)."""

    def __init__(self, page):
        self.entries: list[dict] = []
        page.on("console", lambda m: self.entries.append(
            {"type": m.type, "text": m.text, "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: self.entries.append(
            {"type": "pageerror", "text": f"{e.name}: {e.message}", "url": e.stack or ""}))

    def errors(self, since: int = 0) -> list[dict]:
        return [e for e in self.entries[since:] if e["type"] in ("error", "pageerror") and not _host_version_mismatch(e)]

    def ours(self) -> list[dict]:
        return [e for e in self.errors() if EXTENSION_URL in e["url"] or EXTENSION_URL in e["text"]
                or "duge" in e["text"].lower()]


@pytest.fixture(scope="module")
def browser_page(server, tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_FLAGS,
            headless=True, viewport={"width": 2000, "height": 1400})
        page = context.new_page()
        console = Console(page)
        page.goto(server.url, wait_until="load", timeout=180_000)
        page.wait_for_function("() => window.app?.graph && window.app?.extensionManager", timeout=180_000)
        page.wait_for_function("() => app.extensions.length > 0", timeout=60_000)
        try:
            yield page, console
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            (ARTIFACTS / "comfyui_console.json").write_text(json.dumps(console.entries, indent=1))
            context.close()


def _load_graph(page, workflow: dict) -> dict:
    return page.evaluate("""async (workflow) => {
        await app.loadGraphData(workflow);
        const registered = LiteGraph.registered_node_types;
        return {missing: [...new Set(workflow.nodes.map((n) => n.type).filter((t) => !(t in registered)))],
                loaded: app.graph.nodes.length};
    }""", workflow)


def _screenshot(page, name: str, scale: float = 0.62, offset=(40, 90)) -> Path:
    page.evaluate("""([scale, offset]) => {
        app.canvas.ds.scale = scale; app.canvas.ds.offset = offset; app.graph.setDirtyCanvas(true, true);
    }""", [scale, list(offset)])
    page.wait_for_timeout(1500)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path))
    return path


def test_extension_is_served_and_registered(server, browser_page):
    page, console = browser_page
    assert f"{EXTENSION_URL}duge.js" in server.get("/extensions")
    assert "duge.unlearning" in page.evaluate("() => app.extensions.map((e) => e.name)")
    assert not console.ours(), console.ours()


@pytest.mark.parametrize("name", ["duge_demo", "duge_sd15_checkpoint"])
def test_example_workflow_loads_with_no_missing_node(browser_page, name):
    page, console = browser_page
    workflow = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
    mark = len(console.entries)
    result = _load_graph(page, workflow)
    assert result["missing"] == [] and result["loaded"] == len(workflow["nodes"])
    assert page.evaluate(f"async () => (await app.api.getWorkflowTemplates())['{PACK_NAME}']").count(name) == 1
    thumbnail = f"/api/workflow_templates/{PACK_NAME}/{name}.jpg"  # what the template browser shows
    assert page.evaluate("async (url) => (await fetch(url)).status", thumbnail) == 200
    _screenshot(page, f"comfyui_{name}.png" if name != "duge_demo" else "comfyui_demo_workflow.png")
    assert not console.errors(since=mark), console.errors(since=mark)


@pytest.mark.parametrize("name", ["duge_demo", "duge_sd15_checkpoint"])
def test_frontend_converts_the_workflow_to_its_api_twin(browser_page, server, name):
    page, _ = browser_page
    object_info = server.get("/object_info")
    workflow = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
    _load_graph(page, workflow)
    output = page.evaluate("async () => (await app.graphToPrompt()).output")
    for node in output.values():  # the frontend also sends display-only widgets (PreviewAny's "preview")
        known = {name for group in object_info[node["class_type"]]["input"].values() for name in group}
        node["inputs"] = {k: v for k, v in node["inputs"].items() if k in known}
    assert output == ui_to_api(workflow, object_info)
    assert output == json.loads((REPO / "workflows" / "api" / f"{name}_api.json").read_text())


def test_concept_set_text_is_marked_ignored_while_a_file_is_selected(browser_page):
    page, console = browser_page
    _load_graph(page, json.loads((TEMPLATES_DIR / "duge_demo.json").read_text()))
    state = page.evaluate("""() => {
        const node = app.graph.nodes.find((n) => n.type === "DugeLoadConceptSet");
        const file = node.widgets.find((w) => w.name === "file"), text = node.widgets.find((w) => w.name === "text");
        const select = (value) => { file.value = value; file.callback(value); return [text.element.style.opacity, text.element.title]; };
        const typedAtLoad = text.element.style.opacity;
        const withFile = select("demo.yaml");
        text.value = "";
        const typed = select("(typed text below)");
        return {typedAtLoad, withFile, typed, example: text.value};
    }""")
    assert state["typedAtLoad"] == "" and state["typed"] == ["", ""]
    assert state["withFile"][0] == "0.5" and "demo.yaml" in state["withFile"][1]
    assert "target:" in state["example"], "an empty box gets an example set to edit"
    assert not console.ours(), console.ours()


def test_demo_runs_from_the_page_and_unlearn_shows_what_was_erased(browser_page):
    page, console = browser_page
    _load_graph(page, json.loads((TEMPLATES_DIR / "duge_demo.json").read_text()))
    mark = len(console.entries)
    page.evaluate("""async () => {
        window.__dugeRun = null;
        app.api.addEventListener("execution_success", () => { window.__dugeRun = "success"; });
        app.api.addEventListener("execution_error", (e) => { window.__dugeRun = JSON.stringify(e.detail); });
        await app.queuePrompt(0, 1);
    }""")
    page.wait_for_function("() => window.__dugeRun", timeout=RUN_TIMEOUT_MS, polling=2000)
    assert page.evaluate("() => window.__dugeRun") == "success"
    page.wait_for_timeout(2000)
    summary = page.evaluate("""() => app.graph.nodes.find((n) => n.type === "DugeUnlearn")
        .widgets.find((w) => w.name === "duge_summary").value""")
    lines = summary.splitlines()
    assert lines[0].endswith("1 request(s) erased so far")
    assert lines[2].split()[:3] == ["#", "erased", "anchor"] and lines[3].split()[:2] == ["1", "circle"]
    assert "erase 'circle'" in summary  # the run's report below the table
    _screenshot(page, "comfyui_demo_run.png")
    assert not console.errors(since=mark), console.errors(since=mark)
    assert not console.ours(), console.ours()


def _node_screenshot(page, node_type: str, name: str) -> Path:
    """A screenshot of one node (at the canvas' current scale), kept in test-artifacts/."""
    box = page.evaluate("""(type) => {
        const node = app.graph.nodes.find((n) => n.type === type), scale = app.canvas.ds.scale;
        const [x, y] = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT]);
        const rect = app.canvas.canvas.getBoundingClientRect();
        return {x: rect.left + x - 10, y: rect.top + y - 10, width: node.size[0] * scale + 20,
                height: (node.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * scale + 20};
    }""", node_type)
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), clip={k: max(0, v) for k, v in box.items()})
    return path


def _canvas_pixels(page, selector: str):
    """The pixels of a <canvas> on the page, as an RGB PIL image."""
    import base64
    import io

    from PIL import Image

    data_url = page.evaluate("(selector) => document.querySelector(selector).toDataURL('image/png')", selector)
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB")


def test_probe_heatmaps_enlarge_on_click(browser_page, server):
    """After the demo's run (the test above, on the same page): Attention Probe shows its heatmaps
    as tiles; clicking the after-model's 'circle' tile shows that map enlarged, with its model, word
    and prompt; clicking the enlarged map goes back to the tiles."""
    import numpy as np
    from PIL import Image

    page, console = browser_page
    mark = len(console.entries)
    page.evaluate("""() => {  // the probe node at the top left of the view, at 100 %
        const node = app.graph.nodes.find((n) => n.type === "DugeAttentionProbe");
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [40 - node.pos[0], 60 - node.pos[1]];
        app.graph.setDirtyCanvas(true, true);
    }""")
    tiles = page.locator(".duge-heatmap-tile")
    tiles.first.wait_for(state="visible", timeout=30_000)
    probe = page.evaluate("""() => app.graph.nodes.find((n) => n.type === "DugeAttentionProbe")
        .widgets.find((w) => w.name === "duge_heatmaps").viewer.probe""")  # the node's ui output, as received
    assert tiles.count() == len(probe["rows"]) * len(probe["columns"]) == 2 * 3
    assert probe["rows"] == ["model", "model 2"] and probe["columns"] == ["image", "circle", "red"]

    _node_screenshot(page, "DugeAttentionProbe", "comfyui_probe_heatmaps.png")
    page.locator('.duge-heatmap-tile[data-row="1"][data-column="1"]').click()  # a real click, through the canvas' DOM layer
    enlarged = page.locator(".duge-heatmap-enlarged")
    enlarged.wait_for(state="visible", timeout=10_000)
    caption = enlarged.locator("figcaption").inner_text()
    assert "model 2" in caption and "“circle”" in caption and "prompt: a red circle" in caption
    assert tiles.count() == 0

    # the enlarged canvas is that tile of the panel the node saved, scaled up without smoothing
    image = probe["image"]
    panel = Image.open(server.workdir / "temp" / "temp" / image["subfolder"] / image["filename"]).convert("RGB")
    x, y, cell = probe["left"] + 1 * probe["cell"], probe["top"] + 1 * probe["cell"], probe["cell"]
    expected = np.asarray(panel.crop((x, y, x + cell, y + cell)).resize((64, 64), Image.NEAREST), dtype=int)
    shown = _canvas_pixels(page, ".duge-heatmap-enlarged canvas")
    assert shown.size[0] > cell  # enlarged
    shown = np.asarray(shown.resize((64, 64), Image.NEAREST), dtype=int)
    assert np.abs(shown - expected).mean() < 8, "the enlarged view is not the clicked word's heatmap"
    other = np.asarray(panel.crop((x + cell, y, x + 2 * cell, y + cell)).resize((64, 64), Image.NEAREST), dtype=int)
    assert np.abs(shown - other).mean() > np.abs(shown - expected).mean()  # and not the 'red' one next to it

    _node_screenshot(page, "DugeAttentionProbe", "comfyui_probe_heatmap_enlarged.png")

    enlarged.click()
    tiles.first.wait_for(state="visible", timeout=10_000)
    assert tiles.count() == 6
    assert not console.errors(since=mark), console.errors(since=mark)
    assert not console.ours(), console.ours()
