"""One self-contained HTML page per run: WORKDIR/report.html (images inlined as base64).

Tables of val/test metrics with 95% intervals, the shortcut baseline beside the model,
ROC/PR curves and confusion matrices, a grid of test heatmaps, CAM quality when present.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from xmedjax import json_io
from xmedjax.metrics import CI_METRICS


def _img_tag(path: str, width: int | None = None) -> str:
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    style = f' style="width:{width}px"' if width else ""
    return f'<img src="data:image/png;base64,{data}"{style}>'


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.3f}"
    return html.escape(str(value))


def metrics_table(results: dict) -> str:
    splits = [
        s
        for s in results
        if isinstance(results.get(s), dict)
        and "accuracy" in results[s]
        and s != "shortcut_baseline"
    ]
    rows = ["<tr><th>metric</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in splits) + "</tr>"]
    for m in CI_METRICS + ("loss",):
        cells = []
        for s in splits:
            r = results[s]
            ci = r.get("ci95", {}).get(m)
            text = _fmt(r.get(m))
            if ci and None not in ci:
                text += f" <span class=ci>[{ci[0]:.3f}, {ci[1]:.3f}]</span>"
            cells.append(f"<td>{text}</td>")
        rows.append(f"<tr><td>{m}</td>{''.join(cells)}</tr>")
    thr = [results[s].get("threshold") for s in splits]
    rows.append("<tr><td>threshold</td>" + "".join(f"<td>{_fmt(t)}</td>" for t in thr) + "</tr>")
    rows.append(
        "<tr><td>n</td>" + "".join(f"<td>{results[s].get('n')}</td>" for s in splits) + "</tr>"
    )
    return "<table>" + "".join(rows) + "</table>"


def per_class_table(result: dict) -> str:
    per = result.get("per_class") or {}
    if not per:
        return ""
    keys = ["precision", "recall", "f1-score", "support"]
    rows = ["<tr><th>class</th>" + "".join(f"<th>{k}</th>" for k in keys) + "</tr>"]
    for name, r in per.items():
        rows.append(
            f"<tr><td>{html.escape(name)}</td>"
            + "".join(f"<td>{_fmt(r.get(k))}</td>" for k in keys)
            + "</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def shortcut_section(results: dict) -> str:
    base = results.get("shortcut_baseline")
    if not base:
        return (
            "<p>Shortcut baseline: not available for this dataset (the data package provides "
            "<code>data_prep.shortcut.prepared_baseline</code>).</p>"
        )
    test = results.get("test", {})
    rows = [
        "<tr><th></th><th>accuracy</th><th>auc_roc</th></tr>",
        f"<tr><td>model (test)</td><td>{_fmt(test.get('accuracy'))}</td><td>{_fmt(test.get('auc_roc'))}</td></tr>",
        f"<tr><td>shortcut baseline</td><td>{_fmt(base.get('accuracy'))}</td><td>{_fmt(base.get('auc_roc'))}</td></tr>",
    ]
    note = html.escape(str(base.get("note", "")))
    if "risk" in base:
        groups = ", ".join(map(str, base.get("risky_groups") or [])) or "none"
        verdict = (
            "<b>Shortcut risk</b>: metadata alone predicts the label (groups: "
            + html.escape(groups)
            + ")."
            if base["risk"]
            else "No shortcut risk flagged: metadata alone does not predict the label."
        )
        note = verdict + " " + note
    err = f"<p class=ci>{html.escape(base['error'])}</p>" if base.get("error") else ""
    return "<table>" + "".join(rows) + f"</table><p>{note}</p>{err}"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}.ci{color:#777;font-size:85%}
.row{display:flex;flex-wrap:wrap;gap:10px}code{background:#f3f3f3;padding:1px 4px}"""


def write_report(
    workdir: str,
    results: dict,
    *,
    figures: dict[str, dict[str, str]] | None = None,
    run_info: dict | None = None,
    explain_html: str = "",
) -> str:
    """Writes WORKDIR/report.html and returns its path.

    figures: split -> {"roc"|"pr"|"confusion": png path}; explain_html: the explain
    package's fragment (quality table and per-method heatmap grids,
    `xmedjax.explain.export.report_section_html`).
    """
    figures = figures or {}
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>xmedjax report</title><style>{_CSS}</style></head><body>",
        "<h1>xmedjax run report</h1>",
    ]
    if run_info:
        parts.append(
            "<p>"
            + "<br>".join(
                f"<b>{html.escape(k)}</b>: {html.escape(str(v))}" for k, v in run_info.items()
            )
            + "</p>"
        )
    parts.append(
        "<h2>Metrics</h2><p>Binary decision threshold chosen on val (Youden's J) and applied unchanged "
        "to test; bracketed values are 95% bootstrap intervals.</p>"
    )
    parts.append(metrics_table(results))
    parts.append("<h2>Shortcut baseline</h2>" + shortcut_section(results))
    for split, figs in figures.items():
        parts.append(f"<h2>{html.escape(split)}</h2><div class=row>")
        parts.extend(_img_tag(figs.get(k, "")) for k in ("roc", "pr", "confusion"))
        parts.append("</div>")
        if split in results:
            parts.append(per_class_table(results[split]))
    if explain_html:
        parts.append("<h2>Explanations</h2>" + explain_html)
    parts.append("</body></html>")
    return json_io.write_text_atomic(os.path.join(workdir, "report.html"), "\n".join(parts))
