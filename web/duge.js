/**
 * DUGE node pack — frontend extension (served through WEB_DIRECTORY = "./web").
 *
 * - DUGE Unlearn: after a run the node shows what the edited model has had erased — each request's
 *   target, anchor, kept concepts, steps, time and, when measured, the evaluator's UA / IRA / CRA —
 *   and the run's report. The node sends them in its `ui` output (`duge_manifest`, `text`).
 * - Load Concept Set: while a file is selected the text box is dimmed and says it is ignored;
 *   choosing "(typed text below)" with an empty box fills in an example set to edit.
 */
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "duge.unlearning";
const TYPED_TEXT = "(typed text below)";
const SUMMARY_WIDGET = "duge_summary";
const EXAMPLE_SET = "name: my set\nrequests:\n  - target: circle\n    preserve: [square, heart]\n";
const METRICS = ["UA", "IRA", "CRA"];

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

app.registerExtension({
  name: EXTENSION,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "DugeUnlearn") addRunSummary(nodeType);
    if (nodeData.name === "DugeLoadConceptSet") addConceptSetHint(nodeType);
  },
});
