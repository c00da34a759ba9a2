"""Every saliency method on several trained models, as one markdown table (open question 1).

    python -m xmedjax.compare --workdirs=runs/brain_resnet,runs/brain_densenet \\
        [--split=test] [--images=64] [--cam_layer=auto] [--methods=gradcam,...] \\
        [--compilation_cache_dir=~/.cache/xmedjax/jax] --out=docs/cam_comparison.md

Each workdir is a trained run, read with `xmedjax.runs.load_trained`: its config.json
(validated) and best checkpoint. Nothing in those work directories is created or changed.
`--configs=a.py,b.py` names config files to use instead of the config.json files. The split
must have lesion masks (or every localisation column is n/a). For each model the same fixed
subset is scored (the first `--images` images with a non-empty mask, explaining the true
class) with `quality.score_methods`: pointing game, energy in mask, IoU, deletion/insertion
AUC, and the weight-randomisation Spearman; the CAM target layer is chosen per model by
`cams.auto_cam_layer` unless `--cam_layer` is set. Writes OUT (markdown) and OUT's `.json`
sibling (the scores), and prints the table.

`compare_models`, `markdown_table` and `compare_workdirs` are the library form.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from xmedjax import cli_errors, input_pipeline, names
from xmedjax.explain import quality as quality_lib
from xmedjax.explain.cams import auto_cam_layer
from xmedjax.explain.run import method_options
from xmedjax.input_pipeline import Preprocess

COLUMNS = (
    ("pointing_game", "PG"),
    ("energy_in_mask", "energy"),
    ("deletion_auc", "del AUC"),
    ("insertion_auc", "ins AUC"),
    ("sanity_randomization_spearman", "rand-wts rho"),
)


def load_subset(
    data_dir: str, split: str, *, preprocess: Preprocess, n_images: int
) -> dict[str, np.ndarray | None]:
    """The first `n_images` images of a split with a non-empty mask (all images when no masks):
    the same subset as the explain mode's quality stage (`quality.QualitySubset`)."""
    subset = quality_lib.QualitySubset(n_images)
    batches = input_pipeline.make_eval_iterator(
        data_dir, split, global_batch_size=32, preprocess=preprocess, shard_index=0, shard_count=1
    )
    for batch in batches:
        subset.add(batch, batch["valid"])
        arrays = subset.arrays()
        if arrays is not None and len(arrays["images"]) >= n_images:
            break
    arrays = subset.arrays()
    if arrays is None:
        raise ValueError(f"split {split!r} of {data_dir} has no images with a lesion mask")
    return {k: (None if v is None else v[:n_images]) for k, v in arrays.items()}


def compare_models(
    models: Sequence[dict[str, Any]],
    *,
    split: str = "test",
    n_images: int = 64,
    methods: Sequence[str] = names.QUALITY_METHODS,
    method_opts: dict[str, dict] | None = None,
    cam_layer: str | None = "auto",
    steps: int = 16,
    seed: int = 0,
) -> dict[str, dict]:
    """Scores every method on each model; returns {label: {"scores": ..., "meta": ...}}.

    Each entry of `models` (see `model_entry`): label, graphdef, state, data_dir, preprocess.
    """
    opts = method_options(method_opts)
    out = {}
    for entry in models:
        started = time.time()
        preprocess = entry["preprocess"]
        subset = load_subset(entry["data_dir"], split, preprocess=preprocess, n_images=n_images)
        layer = cam_layer
        if layer == "auto":
            layer = auto_cam_layer(entry["graphdef"], entry["state"], preprocess.shape)
        scores = quality_lib.score_methods(
            entry["graphdef"],
            entry["state"],
            subset["images"],
            subset["labels"],
            subset["masks"],
            tuple(methods),
            method_opts=opts,
            steps=steps,
            cascade="ends",
            layer=layer,
            seed=seed,
        )
        out[entry["label"]] = {
            "scores": scores,
            "meta": {
                "n_images": int(len(subset["images"])),
                "cam_layer": layer or "model target",
                "split": split,
                "image_size": preprocess.image_size,
                "seconds": round(time.time() - started, 1),
            },
        }
    return out


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


_LEGEND = (
    "PG: pointing game (map maximum inside the lesion); energy: fraction of the map inside the "
    "lesion; del/ins AUC: target probability while the most salient pixels are blurred / "
    "restored (lower / higher is better); rand-wts rho: Spearman correlation with the map after "
    "randomising every weight (lower is better; the model-free `random` baseline keeps 1)."
)


def _model_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for label, result in results.items():
        meta = result["meta"]
        lines.append(
            f"- **{label}**: {meta['n_images']} images of split `{meta['split']}` with a lesion, "
            f"{meta['image_size']} px, CAM layer `{meta['cam_layer']}`, explaining the true "
            f"class ({meta['seconds']} s)."
        )
    return lines


def _ranking_lines(results: dict[str, dict]) -> list[str]:
    lines = []
    for label, result in results.items():
        scores = {m: s for m, s in result["scores"].items() if m != "random"}
        ranked = sorted(
            scores, key=lambda m: -np.nan_to_num(scores[m].get("pointing_game", np.nan), nan=-1)
        )
        if ranked:
            best, worst = ranked[0], ranked[-1]
            rnd = result["scores"].get("random", {}).get("pointing_game")
            lines.append(
                f"- {label}: best pointing game `{best}` "
                f"({_fmt(scores[best].get('pointing_game'))}), worst `{worst}` "
                f"({_fmt(scores[worst].get('pointing_game'))}), random {_fmt(rnd)}."
            )
    return lines


def markdown_table(
    results: dict[str, dict],
    *,
    title: str = "Saliency methods compared",
    command: str | None = None,
) -> str:
    """Methods as rows; per model: pointing game, energy in mask, del/ins AUC, rand-wts Spearman."""
    labels = list(results)
    methods = list(next(iter(results.values()))["scores"]) if results else []
    head = ["method"] + [f"{label} {short}" for label in labels for _, short in COLUMNS]
    lines = [f"## {title}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    lines += _model_lines(results)
    lines += ["", _LEGEND, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method in methods:
        cells = [method]
        for label in labels:
            s = results[label]["scores"].get(method, {})
            cells += [_fmt(s.get(key)) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += _ranking_lines(results)
    return "\n".join(lines) + "\n"


def load_config_file(path: str) -> Any:
    """`get_config()` of a config file (configs/NAME.py)."""
    spec = importlib.util.spec_from_file_location("xmedjax_compare_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def model_entry(trained: Any, label: str | None = None) -> dict[str, Any]:
    """A `runs.TrainedModel` as a `compare_models` entry (label: the arch by default)."""
    return {
        "label": label or str(trained.config.model.arch),
        "graphdef": trained.graphdef,
        "state": trained.state,
        "data_dir": trained.data_dir,
        "preprocess": Preprocess.from_config(trained.config),
    }


def load_workdir(workdir: str, config_path: str | None = None) -> dict[str, Any]:
    """A trained run's best checkpoint as a `compare_models` entry (read-only)."""
    from xmedjax import runs  # noqa: PLC0415

    config = load_config_file(config_path) if config_path else None
    return model_entry(runs.load_trained(workdir, config))


def compare_workdirs(
    workdirs: Sequence[str], configs: Sequence[str | None] | None = None, **kwargs: Any
) -> dict[str, dict]:
    """`compare_models` over trained runs (labels: arch, plus the folder name when repeated).

    `configs` (one per workdir, None for its config.json); `kwargs` go to `compare_models`.
    """
    configs = list(configs) if configs else [None] * len(workdirs)
    if len(configs) != len(workdirs):
        raise ValueError("name one config per workdir")
    entries: list[dict[str, Any]] = []
    for workdir, config in zip(workdirs, configs, strict=True):
        entry = load_workdir(workdir, config)
        if entry["label"] in [e["label"] for e in entries]:
            entry["label"] = f"{entry['label']} ({os.path.basename(os.path.normpath(workdir))})"
        entries.append(entry)
    return compare_models(entries, **kwargs)


def write_comparison(results: dict[str, dict], out: str, *, command: str | None = None) -> str:
    """OUT (the markdown table) and OUT's .json sibling (meta and scores); returns the table."""
    text = markdown_table(results, command=command)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(
            {k: {"meta": v["meta"], "scores": v["scores"]} for k, v in results.items()},
            f,
            indent=1,
            default=float,
        )
    return text


def _define_flags() -> None:
    from absl import flags  # noqa: PLC0415

    flags.DEFINE_list("workdirs", None, "training run directories", required=True)
    flags.DEFINE_list("configs", [], "config files, one per workdir (default: WORKDIR/config.json)")
    flags.DEFINE_string("split", "test", "split scored (with lesion masks)")
    flags.DEFINE_integer("images", 64, "images with a lesion scored per model")
    flags.DEFINE_string(
        "cam_layer", "auto", "'auto', 'model' (the model's own target) or a layer path"
    )
    flags.DEFINE_list("methods", list(names.QUALITY_METHODS), "saliency methods scored")
    flags.DEFINE_string("out", "docs/cam_comparison.md", "markdown output (+ .json beside it)")
    flags.DEFINE_string(
        "compilation_cache_dir", "~/.cache/xmedjax/jax", "persistent JAX cache ('' = off)"
    )


@cli_errors.one_line_errors("xmedjax.compare")
def main(argv: Sequence[str]) -> None:
    """Command-line entry (absl): see the module docstring; every failure ends in one line."""
    from absl import app, flags, logging  # noqa: PLC0415

    from xmedjax import mesh as mesh_lib  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    if not f["verbosity"].present:  # Orbax info lines drown the output
        logging.set_verbosity(logging.WARNING)
    if f.configs and len(f.configs) != len(f.workdirs):
        raise app.UsageError("--configs must name one config per workdir")
    mesh_lib.setup_compilation_cache(f.compilation_cache_dir)
    results = compare_workdirs(
        f.workdirs,
        f.configs or None,
        split=f.split,
        n_images=f.images,
        methods=tuple(f.methods),
        cam_layer=None if f.cam_layer == "model" else f.cam_layer,
    )
    text = write_comparison(
        results, f.out, command="python -m xmedjax.compare " + " ".join(sys.argv[1:])
    )
    print(text)
    print(f"wrote {f.out}", file=sys.stderr)


__all__ = [
    "COLUMNS",
    "compare_models",
    "compare_workdirs",
    "load_config_file",
    "load_subset",
    "load_workdir",
    "main",
    "markdown_table",
    "model_entry",
    "write_comparison",
]

if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
