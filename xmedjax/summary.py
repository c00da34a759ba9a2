"""One JSON (and a markdown table) of the headline figures of finished runs, read-only.

  python -m xmedjax.summary \
      --runs=brain_resnet50=runs/brain_cpu_resnet50,chest_resnet50=runs/chest_cpu_resnet50 \
      [--pretraining=brain_from_chest=runs/brain_from_chest] \
      --out=docs/results_cpu.json [--markdown=docs/results_cpu.md]

Per run, from its work directory (nothing is recomputed, nothing is written there):

- metrics.json: test `accuracy`, `auc_roc`, `f1`, `average_precision` with `ci95`
  (bootstrap), the same on the leak-free `test_dedup` split when the dataset has one
  (`accuracy_dedup`, `auc_roc_dedup`, ...; AUC is null when that split holds one class), and
  `shortcut_baseline_accuracy` (the metadata-only classifier);
- explain_quality.json: `localisation` {method: pointing_game, energy_in_mask, ci95} on the
  test split's annotated images, and `lesion_reliance`;
- explain_quality_folder.json (predict mode on an annotated external folder): the
  `external` block (sensitivity with its Wilson interval, localisation, lesion reliance) and
  `external_sensitivity`;
- commands.jsonl: `minutes`, the wall time of every finished command (train, predict, ...).

A figure a run does not have is null. A run given as several work directories joined by
`+` (the same config trained with other seeds: `NAME=runs/a+runs/b+runs/c`) reports the
mean over them for every point figure (`accuracy`, ..., `_dedup`, `external_sensitivity`)
and, as its `ci95`, the span of their bootstrap intervals (lowest lower bound, highest upper
bound): where a rerun on another seed or another CPU lands, not only test resampling. Its
`seeds` block lists each work directory's figures; localisation, lesion reliance and the
`external` block are the first work directory's (`details_from`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from xmedjax import json_io

POINT_KEYS = ("accuracy", "auc_roc", "f1", "average_precision", "sensitivity", "specificity")
LOCALISATION_KEYS = ("pointing_game", "energy_in_mask")
NOT_METHODS = ("lesion_reliance", "detection", "any_lesion", "_meta")


def _read(workdir: str, name: str) -> Any:
    path = os.path.join(workdir, name)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _split_figures(split: Mapping[str, Any] | None, suffix: str = "") -> dict[str, Any]:
    split = split or {}
    out = {f"{k}{suffix}": split.get(k) for k in POINT_KEYS}
    out[f"n{suffix}"] = split.get("n")
    out[f"ci95{suffix}"] = {k: (split.get("ci95") or {}).get(k) for k in POINT_KEYS}
    return out


def localisation(quality: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{method: {pointing_game, energy_in_mask, ci95, n_images}} of an explain_quality JSON."""
    out = {}
    for method, scores in (quality or {}).items():
        if method in NOT_METHODS or not isinstance(scores, Mapping):
            continue
        if scores.get("pointing_game") is None:
            continue
        ci = scores.get("ci95") or {}
        out[method] = {
            **{k: scores.get(k) for k in LOCALISATION_KEYS},
            "ci95": {k: ci.get(k) for k in LOCALISATION_KEYS},
            "n_images": scores.get("n_localisation", scores.get("n_images")),
        }
    return out


def reliance(quality: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The headline of a lesion_reliance section: drops and flip rates with intervals."""
    r = (quality or {}).get("lesion_reliance")
    if not r:
        return None
    out: dict[str, Any] = {"n_images": r.get("n_images")}
    for cond in ("lesion_removed", "control_removed", "lesion_only"):
        c = r.get(cond) or {}
        out[cond] = {k: c.get(k) for k in ("mean_drop", "mean_drop_ci95", "flip_rate")}
    vs = r.get("lesion_vs_control") or {}
    out["lesion_vs_control"] = {
        k: vs.get(k) for k in ("mean_drop_difference", "mean_drop_difference_ci95")
    }
    out["original_probability"] = (r.get("original") or {}).get("probability")
    return out


def run_figures(workdir: str) -> dict[str, Any]:
    """The headline figures of one run (see the module docstring)."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no such run directory: {workdir}")
    metrics = _read(workdir, "metrics.json")
    if metrics is None:
        raise FileNotFoundError(f"{workdir}/metrics.json is missing: train or evaluate first")
    config = _read(workdir, "config.json") or {}
    out: dict[str, Any] = {
        "workdir": workdir,
        "arch": (config.get("model") or {}).get("arch"),
        "image_size": (config.get("data") or {}).get("image_size"),
        "width": (config.get("model") or {}).get("width"),
    }
    test = metrics.get((config.get("data") or {}).get("test_split", "test"))
    out.update(_split_figures(test))
    out.update(_split_figures(metrics.get("test_dedup"), "_dedup"))
    shortcut = metrics.get("shortcut_baseline") or {}
    out["shortcut_baseline_accuracy"] = shortcut.get("accuracy")
    quality = _read(workdir, "explain_quality.json")
    out["localisation"] = localisation(quality)
    out["lesion_reliance"] = reliance(quality)
    folder = _read(workdir, "explain_quality_folder.json")
    # "any lesion" (predict.negative_class) when scored: a 4-class model on tumours of any
    # kind; else the positive class's own detection and reliance
    scored = (folder or {}).get("any_lesion") or folder or {}
    detection = scored.get("detection") or {}
    out["external_sensitivity"] = detection.get("sensitivity")
    out["external"] = (
        None
        if folder is None
        else {
            "folder": (folder.get("_meta") or {}).get("folder"),
            "detection": detection or None,
            "localisation": localisation(folder),
            "lesion_reliance": reliance(scored),
        }
    )
    commands = _read(workdir, "commands.jsonl") or []
    seconds = sum(float(c.get("seconds", 0)) for c in commands)
    out["minutes"] = round(seconds / 60, 1) if commands else None
    out["commands"] = [{k: c.get(k) for k in ("mode", "status", "seconds")} for c in commands]
    return out


SEED_KEYS = (
    *POINT_KEYS,
    *(f"{k}_dedup" for k in POINT_KEYS),
    "external_sensitivity",
    "shortcut_baseline_accuracy",
    "minutes",
)


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def _span(intervals: list) -> list | None:
    if any(not ci or None in ci for ci in intervals):
        return None
    return [min(ci[0] for ci in intervals), max(ci[1] for ci in intervals)]


def combine_seeds(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures from several seeds (see the module docstring); one seed as is."""
    if len(figures) == 1:
        return figures[0]
    out = dict(figures[0])
    out["details_from"] = figures[0]["workdir"]
    out["workdir"] = [f["workdir"] for f in figures]
    seeds: dict[str, Any] = {"n": len(figures)}
    for key in SEED_KEYS:
        values = [f.get(key) for f in figures]
        seeds[key] = values
        out[key] = _mean(values)
    seeds["lesion_removed_drop"] = [
        ((f.get("lesion_reliance") or {}).get("lesion_removed") or {}).get("mean_drop")
        for f in figures
    ]
    for suffix in ("", "_dedup"):
        out[f"ci95{suffix}"] = {
            k: _span([(f.get(f"ci95{suffix}") or {}).get(k) for f in figures]) for k in POINT_KEYS
        }
    out["seeds"] = seeds
    return out


def summarise(runs: Mapping[str, str], pretraining: Mapping[str, str] | None = None) -> dict:
    """{"runs": {name: figures}, "pretraining": {name: figures}} of named work directories
    (several joined by "+": seeds of one run, `combine_seeds`)."""

    def figures(workdirs: str) -> dict[str, Any]:
        return combine_seeds([run_figures(wd) for wd in workdirs.split("+") if wd])

    return json_io.to_jsonable(
        {
            "runs": {name: figures(wd) for name, wd in runs.items()},
            "pretraining": {name: figures(wd) for name, wd in (pretraining or {}).items()},
        }
    )


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(v: Any, ci: Any) -> str:
    if v is None:
        return "-"
    if not ci or None in ci:
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(ci[0])}, {_fmt(ci[1])}]"


def markdown(summary: Mapping[str, Any]) -> str:
    """The headline table (one row per run) and a localisation table, as markdown."""
    lines = [
        "| run | test accuracy | AUC-ROC | F1 | AP | leak-free accuracy | shortcut baseline "
        "| external sensitivity | minutes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for section in ("runs", "pretraining"):
        for name, r in summary.get(section, {}).items():
            ci = r.get("ci95") or {}
            ext = ((r.get("external") or {}).get("detection") or {}).get("sensitivity_ci95")
            if r.get("seeds"):  # a mean over seeds: the first seed's interval does not apply
                ext = None
                name = f"{name} ({r['seeds']['n']} seeds)"
            lines.append(
                f"| {name} | {_ci(r['accuracy'], ci.get('accuracy'))} "
                f"| {_ci(r['auc_roc'], ci.get('auc_roc'))} | {_fmt(r['f1'])} "
                f"| {_fmt(r['average_precision'])} "
                f"| {_ci(r['accuracy_dedup'], (r.get('ci95_dedup') or {}).get('accuracy'))} "
                f"| {_fmt(r['shortcut_baseline_accuracy'])} "
                f"| {_ci(r['external_sensitivity'], ext)} | {_fmt(r['minutes'], 1)} |"
            )
    lines += ["", "| run | where | method | pointing game | energy in mask |"]
    lines.append("| --- | --- | --- | --- | --- |")
    for name, r in summary.get("runs", {}).items():
        for where, loc in (("test", r["localisation"]), ("external", _ext_loc(r))):
            for method, s in loc.items():
                ci = s.get("ci95") or {}
                lines.append(
                    f"| {name} | {where} | {method} "
                    f"| {_ci(s['pointing_game'], ci.get('pointing_game'))} "
                    f"| {_ci(s['energy_in_mask'], ci.get('energy_in_mask'))} |"
                )
    return "\n".join(lines) + "\n"


def _ext_loc(r: Mapping[str, Any]) -> dict:
    return (r.get("external") or {}).get("localisation") or {}


def _pairs(text: str, flag: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"--{flag}: expected NAME=WORKDIR[+WORKDIR...][,NAME=...], got {item!r}"
            )
        out[name] = path
    return out


def main(argv: list[str]) -> None:
    from absl import flags  # noqa: PLC0415

    del argv
    f = flags.FLAGS
    summary = summarise(_pairs(f.runs, "runs"), _pairs(f.pretraining, "pretraining"))
    json_io.write_json(f.out, summary, indent=2)
    print(f"wrote {f.out}")
    if f.markdown:
        text = markdown(summary)
        with open(f.markdown, "w") as fh:
            fh.write(text)
        print(f"wrote {f.markdown}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string(
        "runs", None, "NAME=WORKDIR[+WORKDIR: other seeds],... the runs", required=True
    )
    flags.DEFINE_string("pretraining", "", "NAME=WORKDIR,... the pretraining comparison runs")
    flags.DEFINE_string("out", None, "the summary JSON to write", required=True)
    flags.DEFINE_string("markdown", "", "also write the tables as markdown here")
    app.run(main)
