"""How well the phantom model's CAMs localise the lesion, over several seeds (issue 12, section 7).

Trains the saliency tests' phantom model (tests/phantom_training.py, the recipe of
tests/test_quality.py) once per seed and scores every CAM method against the lesion masks
next to two model-free baselines: `random` (seeded uniform maps, the test's baseline) and
`centre` (every map peaks at the image centre: what a lesion-position prior alone scores).
Prints one row per seed and method, then min / mean / max over the seeds and the margin the
test's bound leaves (worst seed).

  PYTHONPATH=$PWD JAX_PLATFORMS=cpu python benchmarks/phantom_localisation.py \
      [--seeds=0,1,2,3,4] [--steps=...] [--learning_rate=...] [--layers=auto,layer3] \
      [--json=/tmp/phantom_localisation.json]

Seed k trains from initialisation seed k on phantoms generated with seed 11 + 1000 k and
tests on seed 12 + 1000 k (k = 0 is exactly the test's set-up). Another CPU type computes
different float32 rounding, which training amplifies; new seeds are a much larger change
than that. To add a CPU-like change on top, run under another XLA instruction set, e.g.
`XLA_FLAGS=--xla_cpu_max_isa=AVX` (convolutions then round differently).

~55 s per seed on 2 cores at the recipe's 400 steps (training ~45 s, the CAMs ~10 s); each
layer also prints the gradient diagnosis of `gradient_diagnosis` (benchmarks/NOTES.md,
"Phantom localisation").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from phantom_training import train_phantom_model, unit_images  # noqa: E402

from data_prep import phantoms  # noqa: E402
from xmedjax.explain import quality  # noqa: E402
from xmedjax.explain.cams import CAM_METHODS, auto_cam_layer, compute_methods  # noqa: E402
from xmedjax.explain.capture import capture_target_gradients  # noqa: E402
from xmedjax.explain.maps import to_input_size  # noqa: E402

BASELINES = ("random", "centre")


def centre_maps(n: int, size: int) -> np.ndarray:
    """Maps that peak at the image centre: a pure lesion-position prior."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[:size, :size]
    prior = 1.0 - np.hypot(yy - c, xx - c) / (np.sqrt(2) * size / 2)
    return np.repeat(prior[None], n, 0)


def gradient_diagnosis(graphdef, state, images, masks, layer) -> dict:
    """Why the channel-weighted CAMs fail at a layer: how much of the gradient its spatial
    average keeps, and what the part Grad-CAM drops localises on its own.

    `mean_over_abs`: median over images and channels of |mean_hw G| / mean_hw |G| (1 when G
    is the same at every position, as at the model's own target; near 0 when its sign
    changes across positions). `deviation_pointing_game`: pointing game of
    relu(sum_c (G_c - mean_hw G_c) A_c), i.e. HiResCAM minus Grad-CAM before the ReLU.
    `gradcam_negative_share`: how much of the Grad-CAM sum's mass is negative (cancelled by
    the ReLU).
    """
    targets = jnp.ones(len(images), jnp.int32)
    cap, _ = jax.jit(capture_target_gradients, static_argnums=(0, 4))(
        graphdef, state, images, targets, layer
    )
    a, g = np.asarray(cap.activation, np.float64), np.asarray(cap.gradient, np.float64)
    mean = g.mean((1, 2), keepdims=True)
    ratio = np.abs(mean[:, 0, 0]) / (np.abs(g).mean((1, 2)) + 1e-30)
    gradcam = (mean * a).sum(-1)
    deviation = np.maximum(((g - mean) * a).sum(-1), 0.0)
    maps = np.asarray(to_input_size(jnp.asarray(deviation, jnp.float32), images.shape[1:3]))
    return {
        "mean_over_abs": float(np.median(ratio)),
        "deviation_pointing_game": float(quality.pointing_game(maps, masks).mean()),
        "gradcam_negative_share": float(
            np.minimum(gradcam, 0).sum() / -(np.abs(gradcam).sum() + 1e-30)
        ),
    }


def one_seed(seed: int, args) -> dict:
    train = phantoms.generate(args.kind, args.train_images, args.size, seed=11 + 1000 * seed)
    test = phantoms.generate(args.kind, args.test_pool, args.size, seed=12 + 1000 * seed)
    t0 = time.time()
    graphdef, state = train_phantom_model(
        train["images"],
        train["labels"],
        steps=args.steps,
        seed=seed,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
    )
    train_s = time.time() - t0
    xt = unit_images(test["images"])
    logits = np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, xt))
    accuracy = float(np.mean(np.argmax(logits, 1) == test["labels"]))
    lesion = test["labels"] == 1
    images = jnp.asarray(xt[lesion][: args.test_images])
    masks = test["masks"][lesion][: args.test_images]
    targets = jnp.ones(len(images), jnp.int32)
    out = {"seed": seed, "accuracy": accuracy, "train_s": round(train_s, 1), "layers": {}}
    out["gradient"] = {}
    for layer in args.layers:
        name = auto_cam_layer(graphdef, state, images.shape[1:]) if layer == "auto" else layer
        name = None if name in ("own", "None") else name
        results = compute_methods(
            graphdef,
            state,
            images,
            targets,
            (*CAM_METHODS, "random"),
            {"scorecam": {"chunk": 32}},
            name,
        )
        scores = {
            m: quality.localisation_scores(np.asarray(r.maps), masks) for m, r in results.items()
        }
        scores["centre"] = quality.localisation_scores(centre_maps(len(masks), args.size), masks)
        out["layers"][f"{layer}={name}"] = scores
        out["gradient"][f"{layer}={name}"] = gradient_diagnosis(
            graphdef, state, images, masks, name
        )
    return out


def summarise(runs: list[dict]) -> dict:
    """{layer: {method: {metric: [min, mean, max]}}} over the seeds."""
    out: dict = {}
    for layer in runs[0]["layers"]:
        out[layer] = {}
        for method in runs[0]["layers"][layer]:
            out[layer][method] = {}
            for metric in ("pointing_game", "energy_in_mask"):
                v = np.array([r["layers"][layer][method][metric] for r in runs])
                out[layer][method][metric] = [float(v.min()), float(v.mean()), float(v.max())]
            margin = np.array(
                [
                    r["layers"][layer][method]["pointing_game"]
                    - r["layers"][layer]["random"]["pointing_game"]
                    for r in runs
                ]
            )
            out[layer][method]["pointing_margin_over_random_min"] = float(margin.min())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--kind", default="brain")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--train_images", type=int, default=512)
    p.add_argument("--test_pool", type=int, default=96)
    p.add_argument("--test_images", type=int, default=32, help="lesion images scored")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--learning_rate", type=float, default=None, help="default: the recipe's")
    p.add_argument("--batch_size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--layers", default="auto", help="auto, own, layer1..layer3 (comma list)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    args.layers = args.layers.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    recipe = {
        k: getattr(args, k)
        for k in ("steps", "learning_rate", "batch_size")
        if getattr(args, k) is not None
    }
    # None means the recipe's default
    for k in ("steps", "learning_rate", "batch_size"):
        if getattr(args, k) is None:
            setattr(args, k, train_phantom_model.__kwdefaults__[k])
    print(f"recipe {recipe or 'default'}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    runs = []
    for seed in seeds:
        r = one_seed(seed, args)
        runs.append(r)
        for layer, scores in r["layers"].items():
            row = "  ".join(
                f"{m} {s['pointing_game']:.2f}/{s['energy_in_mask']:.3f}" for m, s in scores.items()
            )
            print(f"seed {seed} acc {r['accuracy']:.3f} {r['train_s']}s {layer}: {row}", flush=True)
            d = r["gradient"][layer]
            print(
                f"  gradient at {layer}: |mean_hw G|/mean_hw|G| {d['mean_over_abs']:.3f}, "
                f"pointing of the part Grad-CAM drops {d['deviation_pointing_game']:.2f}, "
                f"negative share of the Grad-CAM sum {d['gradcam_negative_share']:.2f}",
                flush=True,
            )
    summary = summarise(runs)
    print("\npointing game / energy in mask: min mean max over seeds", seeds)
    for layer, methods in summary.items():
        print(f"[{layer}]")
        for m, s in methods.items():
            pg, en = s["pointing_game"], s["energy_in_mask"]
            print(
                f"  {m:10s} pg {pg[0]:.3f} {pg[1]:.3f} {pg[2]:.3f}   "
                f"energy {en[0]:.3f} {en[1]:.3f} {en[2]:.3f}   "
                f"worst pg - random {s['pointing_margin_over_random_min']:+.3f}"
            )
    for layer in runs[0]["gradient"]:
        for key in runs[0]["gradient"][layer]:
            v = [r["gradient"][layer][key] for r in runs]
            print(f"  {layer} {key}: min {min(v):.3f} mean {np.mean(v):.3f} max {max(v):.3f}")
    acc = [r["accuracy"] for r in runs]
    print(f"accuracy min {min(acc):.3f} mean {np.mean(acc):.3f} max {max(acc):.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
