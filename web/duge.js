/**
 * DUGE node pack — frontend extension (served through WEB_DIRECTORY = "./web").
 *
 * - DUGE Unlearn: after a run the node shows what the edited model has had erased — each request's
 *   target, anchor, kept concepts, steps, time and, when measured, the evaluator's UA / IRA / CRA —
 *   and the run's report. The node sends them in its `ui` output (`duge_manifest`, `text`).
 * - Load Concept Set: while a file is selected the text box is dimmed and says it is ignored;
 *   choosing "(typed text below)" with an empty box fills in an example set to edit.
 * - Attention Probe: after a run the node shows its heatmaps as a grid of tiles (one row per model,
 *   the generated image then one tile per word); clicking a tile shows it enlarged with its
 *   model, word and prompt, clicking the enlarged view goes back to the grid. The node sends the
 *   panel (a temp image) and where each tile is in it in its `ui` output (`duge_probe`).
 */
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "duge.unlearning";
const TYPED_TEXT = "(typed text below)";
const SUMMARY_WIDGET = "duge_summary";
const EXAMPLE_SET = "name: my set\nrequests:\n  - target: circle\n    preserve: [square, heart]\n";
const METRICS = ["UA", "IRA", "CRA"];
const HEATMAPS_WIDGET = "duge_heatmaps";
const TILE = 72; // px of a tile in the node's grid
const ENLARGED = 256; // px of the enlarged tile

/** A fixed-width table: rows of cells, the first row the header. */
function table(rows) {
  const widths = rows[0].map((_, column) => Math.max(...rows.map((row) => String(row[column]).length)));
  return rows.map((row) => row.map((cell, column) => String(cell).padEnd(widths[column])).join("  ").trimEnd())
    .join("\n");
}

function shorten(text, length) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

/** What the manifest says the model has had erased, as text for the node. */
export function runSummary(manifest, report) {
  const parts = [];
  const requests = Array.isArray(manifest?.requests) ? manifest.requests : [];
  if (requests.length) {
    const measured = METRICS.filter((key) => requests.some((r) => typeof r.metrics?.[key] === "number"));
    const rows = [["#", "erased", "anchor", "kept", "steps", "time", ...measured]];
    requests.forEach((request, index) => {
      const metrics = request.metrics ?? {};
      rows.push([
        index + 1,
        request.target,
        request.anchor === "" ? "(empty prompt)" : (request.anchor ?? "—"),
        shorten((request.preserve ?? []).join(", ") || "—", 28),
        request.settings?.steps ?? "—",
        typeof metrics.seconds === "number" ? `${metrics.seconds.toFixed(1)} s` : "—",
        ...measured.map((key) => (typeof metrics[key] === "number" ? metrics[key].toFixed(2) : "—")),
      ]);
    });
    parts.push(`${manifest.method ?? "duge"} on ${manifest.base_model ?? "the model"}: ` +
      `${requests.length} request(s) erased so far`);
    parts.push(table(rows));
  }
  if (report) parts.push(report);
  return parts.join("\n\n");
}

/** The read-only box under DUGE Unlearn's widgets; not saved in the workflow, not sent to the server. */
function addSummaryWidget(node) {
  const widget = ComfyWidgets.STRING(node, SUMMARY_WIDGET, ["STRING", { multiline: true }], app).widget;
  widget.element.readOnly = true;
  widget.element.placeholder = "After a run: what the model has had erased, with the run's metrics.";
  widget.element.style.fontFamily = "monospace";
  widget.serialize = false; // not in widgets_values ...
  widget.options = { ...widget.options, serialize: false }; // ... nor an input of the prompt (it would change the cache key)
  return widget;
}

function addRunSummary(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    addSummaryWidget(this);
    return result;
  };

  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const manifest = message?.duge_manifest?.[0];
    const report = message?.text?.[0];
    if (!manifest && !report) return;
    const widget = this.widgets?.find((w) => w.name === SUMMARY_WIDGET) ?? addSummaryWidget(this);
    widget.value = runSummary(manifest, report);
    this.setDirtyCanvas?.(true, true);
  };
}

function markTextUse(file, text) {
  const element = text.element;
  if (!element) return;
  const typed = file.value === TYPED_TEXT;
  element.style.opacity = typed ? "" : "0.5";
  element.title = typed ? "" : `Ignored: the concept set comes from ${file.value}. Choose "${TYPED_TEXT}" to use this text.`;
  element.placeholder = typed ? EXAMPLE_SET : `Ignored while ${file.value} is selected above.`;
}

function addConceptSetHint(nodeType) {
  const widgetsOf = (node) => [node.widgets?.find((w) => w.name === "file"), node.widgets?.find((w) => w.name === "text")];

  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const [file, text] = widgetsOf(this);
    if (file && text) {
      const callback = file.callback;
      file.callback = function (value) {
        const out = callback?.apply(this, arguments);
        if (value === TYPED_TEXT && !String(text.value ?? "").trim()) text.value = EXAMPLE_SET;
        markTextUse(file, text);
        return out;
      };
      markTextUse(file, text);
    }
    return result;
  };

  const onConfigure = nodeType.prototype.onConfigure;
  nodeType.prototype.onConfigure = function () {  // a loaded workflow sets the values without the callback
    const result = onConfigure?.apply(this, arguments);
    const [file, text] = widgetsOf(this);
    if (file && text) markTextUse(file, text);
    return result;
  };
}

/** The URL of an image the server saved (`{filename, subfolder, type}`), as the stock previews build it. */
function viewURL(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "", type: image.type ?? "temp" });
  return api.apiURL(`/view?${query}`);
}

/** A canvas with one tile of the panel, drawn at `size` px without smoothing (the maps are coarse). */
function tileCanvas(panel, probe, row, column, size) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(panel, probe.left + column * probe.cell, probe.top + row * probe.cell, probe.cell, probe.cell,
    0, 0, size, size);
  return canvas;
}

function tileLabel(probe, row, column) {
  const where = probe.rows[row] ? `${probe.rows[row]} · ` : "";
  if (column === 0) return `${where}generated image`;
  const missing = probe.found?.[row]?.[column - 1] === false ? " (not in the prompt: no map)" : "";
  return `${where}“${probe.columns[column]}”${missing}`;
}

/** The heatmap viewer under Attention Probe: a grid of tiles, or one tile enlarged with its label. */
class HeatmapViewer {
  /** `onChange` runs after every change of what is shown (the node resizes to fit). */
  constructor(onChange) {
    this.element = document.createElement("div");
    this.element.className = "duge-heatmaps";
    Object.assign(this.element.style, { font: "12px sans-serif", color: "var(--input-text, #ddd)", overflow: "auto" });
    this.probe = null;
    this.panel = null;
    this.selected = null; // [row, column] while a tile is enlarged
    this.showMessage("After a run: the heatmaps, per word. Click one to enlarge it.");
    this.onChange = onChange;
  }

  showMessage(text) {
    const message = document.createElement("div");
    message.className = "duge-heatmaps-message";
    message.textContent = text;
    message.style.opacity = "0.7";
    this.element.replaceChildren(message);
    this.onChange?.();
  }

  /** The node's `duge_probe` output: the panel image and its layout. */
  async load(probe) {
    const panel = new Image();
    panel.src = viewURL(probe.image);
    try {
      await panel.decode();
    } catch {
      this.showMessage(`Could not load the heatmaps (${probe.image.filename}).`);
      return;
    }
    this.probe = probe;
    this.panel = panel;
    this.selected = null;
    this.render();
  }

  select(row, column) {
    this.selected = row === null ? null : [row, column];
    this.render();
  }

  render() {
    const { probe, panel } = this;
    if (!probe || !panel) return;
    if (this.selected) {
      const [row, column] = this.selected;
      const view = document.createElement("figure");
      view.className = "duge-heatmap-enlarged";
      view.title = "Click to go back to all heatmaps";
      Object.assign(view.style, { margin: "0", cursor: "zoom-out", textAlign: "center" });
      const canvas = tileCanvas(panel, probe, row, column, ENLARGED);
      const caption = document.createElement("figcaption");
      caption.textContent = tileLabel(probe, row, column);
      const prompt = document.createElement("div");
      prompt.textContent = `prompt: ${probe.prompt}`;
      prompt.style.opacity = "0.7";
      caption.append(prompt);
      view.append(caption, canvas);
      view.addEventListener("click", () => this.select(null));
      this.element.replaceChildren(view);
      this.onChange?.();
      return;
    }
    const grid = document.createElement("div");
    grid.className = "duge-heatmap-grid";
    Object.assign(grid.style, { display: "grid", gap: "4px", alignItems: "center",
      gridTemplateColumns: `auto repeat(${probe.columns.length}, ${TILE}px)` });
    grid.append(document.createElement("span"));
    for (const title of probe.columns) {
      const header = document.createElement("span");
      header.textContent = title;
      Object.assign(header.style, { overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" });
      grid.append(header);
    }
    probe.rows.forEach((label, row) => {
      const name = document.createElement("span");
      name.textContent = label;
      grid.append(name);
      probe.columns.forEach((_, column) => {
        const tile = tileCanvas(panel, probe, row, column, TILE);
        tile.className = "duge-heatmap-tile";
        tile.dataset.row = String(row);
        tile.dataset.column = String(column);
        tile.title = `${tileLabel(probe, row, column)} — click to enlarge`;
        tile.style.cursor = "zoom-in";
        tile.addEventListener("click", () => this.select(row, column));
        grid.append(tile);
      });
    });
    this.element.replaceChildren(grid);
    this.onChange?.();
  }

  /** Height the node must give the widget. */
  height() {
    if (!this.probe) return 40;
    if (this.selected) return ENLARGED + 48;
    return 24 + this.probe.rows.length * (TILE + 4);
  }
}

function addHeatmapViewer(nodeType) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const node = this;
    const viewer = new HeatmapViewer(() => {  // taller if needed, never wider (it would cover its neighbours)
      node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
      node.setDirtyCanvas?.(true, true);
    });
    const widget = this.addDOMWidget(HEATMAPS_WIDGET, "duge_heatmaps", viewer.element, {
      serialize: false, // neither in widgets_values nor an input of the prompt
      hideOnZoom: false,
      getValue: () => "",
      setValue: () => {},
    });
    widget.serialize = false;
    widget.viewer = viewer;
    widget.computeLayoutSize = () => ({ minHeight: viewer.height(), minWidth: 120 + TILE * 3 });
    return result;
  };

  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const probe = message?.duge_probe?.[0];
    const widget = this.widgets?.find((w) => w.name === HEATMAPS_WIDGET);
    if (probe && widget) widget.viewer.load(probe);
  };
}

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "DugeUnlearn") addRunSummary(nodeType);
    if (nodeData.name === "DugeLoadConceptSet") addConceptSetHint(nodeType);
    if (nodeData.name === "DugeAttentionProbe") addHeatmapViewer(nodeType);
  },
});
