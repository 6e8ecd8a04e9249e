"""`duge report DIR`: one self-contained HTML page for a `duge unlearn` output folder.

Reads DIR/report.json (what `duge.run.run_unlearn` writes), the manifest (DIR/model/
duge_manifest.json or the metadata of DIR/model.safetensors), DIR/before_after.png and any
other PNG in DIR (e.g. plots), and writes DIR/report.html: the run's summary, a table per
request, the final metrics beside the unedited model's, one small chart per metric (UA, IRA and
CRA after each request, the unedited model's value marked; inline SVG), the manifest summary and
every image embedded as a base64 data URI, so the page can be mailed or attached as one file. A benchmark folder (DIR/continual.json from
benchmarks/continual.py) is rendered the same way, one table row per method.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import DugeError
from .paths import atomic_write_text

REPORT_NAME = "report.html"
METRICS = ("UA", "IRA", "CRA", "H", "distance")
SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }
.note { color: #666; font-size: 0.85em; }
.panels { display: flex; flex-wrap: wrap; gap: 12px; }
"""


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.html from a `duge unlearn` (or continual benchmark) output folder; return its path.

    Raises DugeError when the folder has neither report.json nor continual.json, or one of them
    is not valid JSON.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DugeError(f"'{run_dir}' is not a folder; expected the output folder of `duge unlearn`")
    if (run_dir / "report.json").exists():
        body = _run_body(run_dir, _read_json(run_dir / "report.json"))
        title = "DUGE unlearning report"
    elif (run_dir / "continual.json").exists():
        body = _benchmark_body(run_dir, _read_json(run_dir / "continual.json"))
        title = "DUGE continual benchmark"
    else:
        raise DugeError(f"'{run_dir}' has no report.json (nor continual.json); expected the output folder of "
                        "`duge unlearn` or of benchmarks/continual.py")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n{body}\n</body></html>\n")
    return atomic_write_text(run_dir / REPORT_NAME, page, overwrite=True)


# ---------------------------------------------------------------- a `duge unlearn` folder


def _run_body(run_dir: Path, report: dict) -> str:
    parts = []
    summary = [("model", report.get("model")), ("concept set", report.get("concept_set")),
               ("method", report.get("method")), ("setting", report.get("setting")),
               ("requests", len(report.get("requests") or [])),
               ("total seconds", _num(report.get("seconds_total"), 1)),
               ("peak memory (MiB)", _num(report.get("peak_memory_mb"), 0))]
    parts.append(_key_value_table(summary))
    for note in report.get("notes") or []:  # what resolving the requests changed (e.g. for an earlier run's erasures)
        parts.append(f'<p class="note">{_e(note)}</p>')

    requests = report.get("requests") or []
    if requests:
        parts.append("<h2>Requests</h2>")
        columns = ["#", "target", "steps", "seconds", *[m for m in METRICS if any(_metric(r, m) is not None for r in requests)]]
        rows = []
        for k, r in enumerate(requests, start=1):
            rows.append([k, r.get("target"), r.get("steps"), _num(r.get("seconds"), 1),
                         *[_num(_metric(r, m)) for m in columns[4:]]])
        parts.append(_table(columns, rows, text_columns={1}))
        parts.append('<p class="note">UA: share of images prompted with an erased concept (paraphrased, every name) '
                     "not read as it; IRA/CRA: accuracy on kept concepts of the same / other kinds; H: their harmonic "
                     "mean; metrics are cumulative over every request so far.</p>")
        panels = [_metric_panel(m, [_metric(r, m) for r in requests], (report.get("before") or {}).get(m))
                  for m in ("UA", "IRA", "CRA")]
        if any(panels):
            parts.append('<div class="panels">' + "".join(p for p in panels if p) + "</div>")
            parts.append('<p class="note">One panel per metric, each scaled to where its values lie; the hollow '
                         "point at request 0 and the dashed line are the unedited model's value.</p>")

    final = report.get("final") or {}
    before = report.get("before") or {}
    if final or before:
        parts.append("<h2>Final metrics</h2>")
        keys = [k for k in ("UA", "IRA", "CRA", "H", "distance", "IRA_ratio", "CRA_ratio")
                if final.get(k) is not None or before.get(k) is not None]
        rows = [["after the last request", *[_num(final.get(k)) for k in keys]]]
        if before:
            rows.append(["unedited model", *[_num(before.get(k)) for k in keys]])
        parts.append(_table(["", *keys], rows, text_columns={0}))

    parts.append(_robustness_section(run_dir, report.get("robustness")))
    parts.append(_images_section(run_dir))
    manifest = _manifest(run_dir)
    if manifest:
        parts.append("<h2>Manifest</h2>")
        parts.append(_key_value_table([("method", manifest.get("method")), ("version", manifest.get("version")),
                                       ("base model", manifest.get("base_model")),
                                       ("base model hash", manifest.get("base_model_hash")),
                                       ("created", manifest.get("created"))]))
        rows = [[k, q.get("target"), "(the empty prompt)" if q.get("anchor") == "" else q.get("anchor"),
                 ", ".join(q.get("preserve") or []),
                 ", ".join(f"{a}={b}" for a, b in (q.get("settings") or {}).items())]
                for k, q in enumerate(manifest.get("requests") or [], start=1)]
        if rows:
            parts.append(_table(["#", "target", "anchor", "preserved", "settings"], rows, text_columns={1, 2, 3, 4}))
    config = report.get("config")
    if config:
        parts.append("<h2>Configuration</h2>")
        parts.append(_key_value_table(sorted(config.items())))
    return "\n".join(p for p in parts if p)


def _robustness_section(run_dir: Path, robustness: dict | None) -> str:
    """`duge unlearn --attack`: per erased concept the plain prompt's UA, each attack's (with what it found) and
    the post-attack UA, then the attacks' images beside the plain prompt's (robustness/attacks.png)."""
    if not robustness:
        return ""
    config = robustness.get("config") or {}
    parts = ["<h2>Robustness: does an erased concept come back?</h2>",
             f'<p class="note">Two attacks per erased concept, each with a budget of {_e(config.get("budget"))} '
             "UNet passes: a search for prompt tokens and a learnt token embedding (concept inversion), both "
             "minimising the edited model's denoising loss on the unedited model's images of the concept. "
             f"Judged by the evaluator on {_e(config.get('eval_images'))} images from held-out seeds (from "
             f"{_e(config.get('eval_seed'))}); UA: share of those images that do not show the concept; post-attack: "
             "the lowest of the three.</p>"]
    rows = []
    for concept in robustness.get("concepts") or []:
        found = {a.get("attack"): a for a in concept.get("attacks") or []}
        prompt, inversion = found.get("prompt") or {}, found.get("inversion") or {}
        nearest = ", ".join(inversion.get("nearest_tokens") or [])
        rows.append([concept.get("concept"), concept.get("prompt"), _num(concept.get("ua_plain")),
                     _num(prompt.get("ua")), prompt.get("prompt", ""), _num(inversion.get("ua")),
                     f"nearest words: {nearest}" if nearest else "", _num(concept.get("post_attack_UA"))])
    parts.append(_table(["concept", "plain prompt", "UA plain", "UA prompt attack", "prompt found",
                         "UA inversion", "learnt token", "post-attack UA"], rows, text_columns={0, 1, 4, 6}))
    parts.append(_key_value_table([("mean UA, plain prompts", _num(robustness.get("UA_plain"))),
                                   ("mean post-attack UA", _num(robustness.get("post_attack_UA"))),
                                   ("UNet passes", robustness.get("unet_passes")),
                                   ("seconds", _num(robustness.get("seconds"), 1))]))
    image = run_dir / (robustness.get("images") or "")
    if robustness.get("images") and image.is_file() and image.resolve().is_relative_to(run_dir.resolve()):
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="attack images">'
                     '<figcaption class="note">per concept: the plain prompt\'s images, then the prompt attack\'s and '
                     "the inversion's, the same held-out seeds</figcaption></figure>")
    return "\n".join(parts)


def _metric(request: dict, key: str):
    if request.get(key) is not None:
        return request[key]
    return (request.get("details") or {}).get(key)




def _manifest(run_dir: Path) -> dict | None:
    folder_manifest = run_dir / "model" / "duge_manifest.json"
    try:
        if folder_manifest.exists():
            return json.loads(folder_manifest.read_text(encoding="utf-8"))
        if (run_dir / "model.safetensors").exists():
            from .io import read_manifest  # deferred: io imports torch, which writing a report does not need

            return read_manifest(run_dir / "model.safetensors")
    except (OSError, ValueError, DugeError):
        return None
    return None


# ---------------------------------------------------------------- a benchmark folder


def _benchmark_body(run_dir: Path, result: dict) -> str:
    parts = [_key_value_table([("model", result.get("model")), ("concept set", result.get("concept_set")),
                               ("requests", ", ".join(result.get("requests") or [])),
                               ("setting", result.get("setting")), ("memory", result.get("memory_measure")),
                               ("total seconds", _num(result.get("seconds_total"), 0))])]
    parts.append("<h2>Final metrics</h2>")
    columns = ["method", *METRICS, "IRA/base", "CRA/base", "s/request", "s/step", "peak MiB", "peak +MiB"]
    rows = []
    base = (result.get("base") or {}).get("requests") or [{}]
    rows.append(["unedited", *[_num(base[-1].get(m)) for m in METRICS[:4]],
                 _num((result.get("base") or {}).get("distance_floor")), *[""] * 6])
    for name, entry in (result.get("methods") or {}).items():
        if "error" in entry:
            rows.append([name, entry["error"], *[""] * (len(columns) - 2)])
            continue
        f = entry.get("final") or {}
        rows.append([name, *[_num(f.get(m)) for m in METRICS], _num(f.get("IRA_ratio")), _num(f.get("CRA_ratio")),
                     _num(entry.get("mean_seconds_per_request"), 1), _num(entry.get("seconds_per_step"), 3),
                     _num(entry.get("peak_memory_mb"), 0), _num(entry.get("peak_increase_mb"), 0)])
    parts.append(_table(columns, rows, text_columns={0}))
    for metric in ("IRA", "CRA", "distance"):
        series = {name: [r.get(metric) for r in entry.get("requests") or []]
                  for name, entry in (result.get("methods") or {}).items() if entry.get("requests")}
        chart = _line_chart(series, title=f"{metric} after each request",
                            y_range=None if metric == "distance" else (0.0, 1.0))
        if chart:
            parts.append(chart)
    parts.append(_images_section(run_dir))
    return "\n".join(parts)


# ---------------------------------------------------------------- HTML pieces


def _images_section(run_dir: Path) -> str:
    images = sorted(run_dir.glob("*.png"), key=lambda p: (p.name != "before_after.png", p.name))
    if not images:
        return ""
    parts = ["<h2>Images</h2>"]
    for path in images:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{_e(path.name)}\">"
                     f"<figcaption class=\"note\">{_e(path.name)}</figcaption></figure>")
    return "\n".join(parts)


def _line_chart(series: dict[str, list], title: str = "",
                y_range: tuple[float, float] | None = None, width: int = 640, height: int = 240) -> str:
    """An inline SVG line chart: one polyline per series over request numbers 1..n."""
    points = {name: [(i + 1, v) for i, v in enumerate(values) if isinstance(v, (int, float))]
              for name, values in series.items()}
    points = {name: p for name, p in points.items() if p}
    if not points:
        return ""
    n = max(x for p in points.values() for x, _ in p)
    values = [v for p in points.values() for _, v in p]
    lo, hi = y_range if y_range else (min(0.0, min(values)), max(values) or 1.0)
    if hi <= lo:
        hi = lo + 1.0
    left, right, top, bottom = 45, 110, 20, 30
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + (pw * (x - 1) / (n - 1) if n > 1 else pw / 2)  # noqa: E731
    sy = lambda y: top + ph * (1 - (y - lo) / (hi - lo))  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    if title:
        out.append(f'<text x="{left}" y="13">{_e(title)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        out.append(f'<text x="{left - 5}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in range(1, n + 1):
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 15}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 3}" text-anchor="middle">request</text>')
    for i, (name, p) in enumerate(points.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(v):.1f}" for x, v in p)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"/>' for x, v in p)
        out.append(f'<text x="{width - right + 8}" y="{top + 14 * i + 10}" fill="{colour}">{_e(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _metric_panel(metric: str, values: list, unedited, width: int = 340, height: int = 230) -> str:
    """An inline SVG panel of one metric after each request (x = 1..n), the unedited model's value at
    x = 0 (hollow point, dashed line); the y axis spans the values and the unedited one, padded, within [0, 1]."""
    points = [(i + 1, v) for i, v in enumerate(values) if isinstance(v, (int, float))]
    if not points:
        return ""
    base = unedited if isinstance(unedited, (int, float)) and not isinstance(unedited, bool) else None
    seen = [v for _, v in points] + ([base] if base is not None else [])
    pad = max(0.02, 0.12 * (max(seen) - min(seen)))
    lo, hi = max(0.0, min(seen) - pad), min(1.0, max(seen) + pad)
    if hi - lo < 0.05:  # a flat series: a window of 0.05 around it
        lo, hi = max(0.0, min(lo, hi - 0.05)), min(1.0, max(hi, lo + 0.05))
    n = max(x for x, _ in points)
    left, right, top, bottom = 52, 14, 30, 36
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + pw * x / n  # noqa: E731  (x = 0 is the unedited model)
    sy = lambda y: top + ph * (1 - (y - lo) / (hi - lo))  # noqa: E731
    colour = SERIES_COLOURS[("UA", "IRA", "CRA").index(metric) if metric in ("UA", "IRA", "CRA") else 0]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="13" '
           f'role="img" aria-label="{_e(metric)} after each request">',
           f'<text x="{left}" y="18" font-weight="bold" fill="{colour}">{_e(metric)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        y = lo + frac * (hi - lo)
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in range(0, n + 1):
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x}</text>')
    caption = "request (0: unedited)" if base is not None else "request"
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{caption}</text>')
    if base is not None:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(base):.1f}" y2="{sy(base):.1f}" stroke="#777" '
                   'stroke-dasharray="5 4"/>')
        out.append(f'<circle cx="{sx(0):.1f}" cy="{sy(base):.1f}" r="4" fill="white" stroke="#555" stroke-width="2"/>')
        out.append(f'<text x="{left + pw - 4}" y="{sy(base) - 5:.1f}" text-anchor="end" fill="#555">'
                   f'unedited {base:.3f}</text>')
    coords = " ".join(f"{sx(x):.1f},{sy(v):.1f}" for x, v in points)
    out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
    for x, v in points:
        out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(v):.1f}" r="4" fill="{colour}"><title>{_e(metric)} after '
                   f'request {x}: {v:.3f}</title></circle>')
    last_x, last_v = points[-1]
    out.append(f'<text x="{sx(last_x) - 6:.1f}" y="{sy(last_v) + (16 if base is not None and last_v < base else -8):.1f}" '
               f'text-anchor="end" fill="{colour}">{last_v:.3f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _table(columns: list, rows: list[list], text_columns: set[int] = frozenset()) -> str:
    head = "".join(f'<th class="text">{_e(c)}</th>' if i in text_columns else f"<th>{_e(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = "".join(f'<td class="text">{_e(v)}</td>' if i in text_columns else f"<td>{_e(v)}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _key_value_table(pairs) -> str:
    rows = "".join(f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(_plain(v))}</td></tr>'
                   for k, v in pairs if v is not None)
    return f"<table>{rows}</table>"


def _plain(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def _num(value, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    return f"{value:.{digits}f}"


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DugeError(f"cannot read '{path}': {err}; expected the JSON that `duge unlearn` writes") from err
