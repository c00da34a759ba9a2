"""Every saliency method on several trained models, as one markdown table (open question 1).

    python -m xmedjax.explain.compare --workdirs=runs/brain_resnet,runs/brain_densenet \\
        [--split=test] [--images=64] --out=docs/cam_comparison.md

Each workdir is a finished training run (its `config.json` and best checkpoint, restored
through `xmedjax.train`); `--configs=a.py,b.py` names the config files instead of reading
`config.json`. The split must have lesion masks (or every localisation column is n/a).
For each model the same fixed subset is scored (the first `--images` images with a
non-empty mask, explaining the true class) with `quality.score_methods`: pointing game,
energy in mask, IoU, deletion/insertion AUC, and the weight-randomisation Spearman; the
CAM target layer is chosen per model by `cams.auto_cam_layer` unless `--cam_layer` is set.

`compare_models` and `markdown_table` are the library form (used by the tests).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from xmedjax.explain import quality as quality_lib
from xmedjax.explain.cams import auto_cam_layer
from xmedjax.explain.run import FAST_OPTS, QUALITY_METHODS, _batches, _collect_subset

COLUMNS = (
    ("pointing_game", "PG"),
    ("energy_in_mask", "energy"),
    ("deletion_auc", "del AUC"),
    ("insertion_auc", "ins AUC"),
    ("sanity_randomization_spearman", "rand-wts rho"),
)


def load_subset(
    data_dir: str, split: str, *, image_size: int, channels: int, normalization: str, n_images: int
) -> dict[str, np.ndarray]:
    """The first `n_images` images of a split with a non-empty mask (all images when no masks)."""
    subset: dict[str, list] = {"images": [], "labels": [], "masks": []}
    has_masks = False
    for batch in _batches(
        data_dir,
        split,
        batch_size=32,
        image_size=image_size,
        channels=channels,
        normalization=normalization,
    ):
        _collect_subset(subset, batch, np.asarray(batch["valid"], bool), n_images)
        has_masks = has_masks or "mask" in batch
        if sum(len(x) for x in subset["images"]) >= n_images:
            break
    if not subset["images"] or not sum(len(x) for x in subset["images"]):
        raise ValueError(f"split {split!r} of {data_dir} has no images with a lesion mask")
    return {
        "images": np.concatenate(subset["images"])[:n_images],
        "labels": np.concatenate(subset["labels"])[:n_images].astype(np.int32),
        "masks": np.concatenate(subset["masks"])[:n_images] if has_masks else None,
    }


def compare_models(
    models: Sequence[dict[str, Any]],
    *,
    split: str = "test",
    n_images: int = 64,
    methods: Sequence[str] = QUALITY_METHODS,
    method_opts: dict[str, dict] | None = None,
    cam_layer: str | None = "auto",
    steps: int = 16,
    seed: int = 0,
) -> dict[str, dict]:
    """Scores every method on each model; returns {label: {"scores": ..., "meta": ...}}.

    Each entry of `models`: label, graphdef, state, data_dir, image_size, channels,
    normalization.
    """
    opts = {k: dict(v) for k, v in FAST_OPTS.items()}
    for k, v in (method_opts or {}).items():
        opts.setdefault(k, {}).update(v)
    out = {}
    for entry in models:
        started = time.time()
        subset = load_subset(
            entry["data_dir"],
            split,
            image_size=entry["image_size"],
            channels=entry["channels"],
            normalization=entry["normalization"],
            n_images=n_images,
        )
        layer = cam_layer
        if layer == "auto":
            layer = auto_cam_layer(
                entry["graphdef"],
                entry["state"],
                (entry["image_size"], entry["image_size"], entry["channels"]),
            )
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
                "image_size": entry["image_size"],
                "seconds": round(time.time() - started, 1),
            },
        }
    return out


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def markdown_table(
    results: dict[str, dict],
    *,
    title: str = "Saliency methods compared",
    command: str | None = None,
) -> str:
    """Methods as rows; per model, pointing game, energy in mask, deletion/insertion AUC, rand-weights Spearman."""
    labels = list(results)
    methods = list(next(iter(results.values()))["scores"]) if results else []
    head = ["method"] + [f"{label} {short}" for label in labels for _, short in COLUMNS]
    lines = [f"## {title}", ""]
    if command:
        lines += [f"Made by `{command}`.", ""]
    for label in labels:
        meta = results[label]["meta"]
        lines.append(
            f"- **{label}**: {meta['n_images']} images of split `{meta['split']}` with a lesion, {meta['image_size']} px, "
            f"CAM layer `{meta['cam_layer']}`, explaining the true class ({meta['seconds']} s)."
        )
    lines += [
        "",
        "PG: pointing game (map maximum inside the lesion); energy: fraction of the map inside the lesion; "
        "del/ins AUC: target probability while the most salient pixels are blurred / restored (lower / higher is "
        "better); rand-wts rho: Spearman correlation with the map after randomising every weight (lower is better; "
        "the model-free `random` baseline keeps 1).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for method in methods:
        cells = [method]
        for label in labels:
            s = results[label]["scores"].get(method, {})
            cells += [_fmt(s.get(key)) for key, _ in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label in labels:
        scores = {m: s for m, s in results[label]["scores"].items() if m != "random"}
        ranked = sorted(
            scores, key=lambda m: -np.nan_to_num(scores[m].get("pointing_game", np.nan), nan=-1)
        )
        if ranked:
            rnd = results[label]["scores"].get("random", {}).get("pointing_game")
            lines.append(
                f"- {label}: best pointing game `{ranked[0]}` ({_fmt(scores[ranked[0]].get('pointing_game'))}), "
                f"worst `{ranked[-1]}` ({_fmt(scores[ranked[-1]].get('pointing_game'))}), random {_fmt(rnd)}."
            )
    return "\n".join(lines) + "\n"


def load_workdir(workdir: str, config_path: str | None = None) -> dict[str, Any]:
    """A trained run's best checkpoint as a `compare_models` entry (restored via xmedjax.runs)."""
    import ml_collections

    from xmedjax import runs

    if config_path:
        import importlib.util

        spec = importlib.util.spec_from_file_location("xmedjax_compare_config", config_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    else:
        with open(os.path.join(workdir, "config.json")) as f:
            config = ml_collections.ConfigDict(json.load(f))
    runs.setup_runtime(config)
    run = runs.build_run(config, workdir)
    state, _ = runs.restore_best(run)
    d = config.data
    return {
        "label": f"{config.model.arch}",
        "graphdef": run.mdef.graphdef,
        "state": runs.host_model_state(state),
        "data_dir": run.data_dir,
        "image_size": int(d.image_size),
        "channels": int(d.channels),
        "normalization": str(d.normalization),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: see the module docstring."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdirs", required=True, help="comma-separated training run directories"
    )
    parser.add_argument(
        "--configs", default="", help="comma-separated config files (default: WORKDIR/config.json)"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--images", type=int, default=64, help="images with a lesion scored per model"
    )
    parser.add_argument(
        "--cam_layer",
        default="auto",
        help="'auto', 'model' (the model's own target) or a layer path",
    )
    parser.add_argument("--out", default="docs/cam_comparison.md")
    args = parser.parse_args(argv)
    workdirs = [w for w in args.workdirs.split(",") if w]
    configs = [c for c in args.configs.split(",") if c] or [None] * len(workdirs)
    if len(configs) != len(workdirs):
        parser.error("--configs must name one config per workdir")
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    entries = []
    for workdir, config in zip(workdirs, configs):
        entry = load_workdir(workdir, config)
        labels = [e["label"] for e in entries]
        if entry["label"] in labels:
            entry["label"] = f"{entry['label']} ({os.path.basename(os.path.normpath(workdir))})"
        entries.append(entry)
    layer = None if args.cam_layer == "model" else args.cam_layer
    results = compare_models(entries, split=args.split, n_images=args.images, cam_layer=layer)
    command = "python -m xmedjax.explain.compare " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = markdown_table(results, command=command)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(
            {k: {"meta": v["meta"], "scores": v["scores"]} for k, v in results.items()},
            f,
            indent=1,
            default=float,
        )
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


__all__ = ["compare_models", "load_subset", "load_workdir", "main", "markdown_table"]

if __name__ == "__main__":
    sys.exit(main())
