"""The heatmap figures of docs/RESULTS.md and the README from finished runs (read-only).

  python docs/make_figures.py --workdir=runs/brain_cpu_resnet50 --method=hirescam \
      --out=docs/figures/brain_cpu_resnet50_hirescam.png

Draws the run's heatmap grid (WORKDIR/heatmaps/<split>_grid.npz, written by the explain
stage: per class, the most and least confident correct and wrong cases) with the lesion
outline in white where the image has one (the borrowed tumour box on the brain set).
"""

from __future__ import annotations

import argparse
import io
import os
import sys

import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xmedjax.explain import export  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--method", default="gradcam")
    p.add_argument("--split", default="test")
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    path = os.path.join(args.workdir, "heatmaps", f"{args.split}_grid.npz")
    if not os.path.isfile(path):
        sys.exit(f"error: {path} is missing: explain the run first (train or explain mode)")
    g = export.read_heatmaps(path)
    key = f"maps_{args.method}"
    if key not in g:
        methods = sorted(k.removeprefix("maps_") for k in g if k.startswith("maps_"))
        sys.exit(f"error: {path} has no {args.method} maps (has {methods})")
    cases = export.select_grid_cases(g["labels"], g["predictions"], g["probabilities"])
    fig = export.heatmap_grid_figure(
        g["images"],
        g[key],
        g["labels"],
        g["predictions"],
        g["probabilities"],
        cases,
        label_names=[str(n) for n in g["label_names"]],
        title=args.title or f"{os.path.basename(args.workdir.rstrip('/'))}: {args.method}",
        masks=g.get("masks"),
        mask_known=g.get("mask_known"),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80)
    # a 128-colour palette keeps a grid of heatmaps readable at a third of the bytes
    PIL.Image.open(buf).convert("RGB").quantize(128).save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)")


if __name__ == "__main__":
    main()
