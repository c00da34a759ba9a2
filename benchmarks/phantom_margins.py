"""The margins of test_quality's phantom CAM assertions over seeds, computed as the test does.

    JAX_PLATFORMS=cpu python benchmarks/phantom_margins.py 0,1,2,3,4
    XLA_FLAGS=--xla_cpu_max_isa=AVX JAX_PLATFORMS=cpu python benchmarks/phantom_margins.py 2,4

Seed k trains the test's phantom model from initialisation seed k on phantoms of seed
11 + 1000 k and scores 32 test tumours of seed 12 + 1000 k (k = 0 is the test itself), then
prints one JSON line: each quantity with its bound in the key ("not asserted": reported
only). About 70 s per seed on 2 cores. A bound belongs in the test only when every run
clears it with a margin.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from phantom_training import train_phantom_model, unit_images  # noqa: E402

from data_prep import phantoms  # noqa: E402
from xmedjax.explain import CAM_METHODS, quality  # noqa: E402
from xmedjax.explain.cams import auto_cam_layer  # noqa: E402

PER_POSITION = ("scorecam", "hirescam", "layercam")


def margins(seed: int) -> dict[str, float]:
    """The test's quantities for one seed."""
    train = phantoms.generate("brain", 512, 64, seed=11 + 1000 * seed)
    test = phantoms.generate("brain", 96, 64, seed=12 + 1000 * seed)
    graphdef, state = train_phantom_model(train["images"], train["labels"], seed=seed)
    images = unit_images(test["images"])
    logits = jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, images)
    lesion = test["labels"] == 1
    scores = quality.score_methods(
        graphdef,
        state,
        images[lesion][:32],
        test["labels"][lesion][:32],
        test["masks"][lesion][:32],
        (*CAM_METHODS, "random"),
        method_opts={"scorecam": {"chunk": 32}},
        faithfulness=True,
        steps=8,
        cascade="ends",
        layer=auto_cam_layer(graphdef, state, (64, 64, 1)),
    )
    rnd = scores["random"]
    energy = {n: scores[n]["energy_in_mask"] / rnd["energy_in_mask"] for n in CAM_METHODS}
    out = {"accuracy (>0.85)": float(np.mean(np.argmax(logits, 1) == test["labels"]))}
    for name in ("scorecam", "hirescam", "layercam", "gradcam"):
        gain = scores[name]["pointing_game"] - rnd["pointing_game"]
        out[f"{name} pointing - random (not asserted)"] = gain
    out["scorecam energy / random (not asserted)"] = energy["scorecam"]
    out["hirescam energy / random (>=1.5)"] = energy["hirescam"]
    out["layercam energy / random (>=1.4)"] = energy["layercam"]
    out["per-position mean energy / random (>=1.5)"] = float(
        np.mean([scores[n]["energy_in_mask"] for n in PER_POSITION]) / rnd["energy_in_mask"]
    )
    sanity = [scores[n]["sanity_randomization_spearman"] for n in CAM_METHODS]
    out["largest sanity (<0.9)"], out["mean sanity (<0.7)"] = max(sanity), float(np.mean(sanity))
    out["random - hirescam deletion (>0.05)"] = (
        rnd["deletion_auc"] - scores["hirescam"]["deletion_auc"]
    )
    out["random - mean deletion (>0)"] = rnd["deletion_auc"] - float(
        np.mean([scores[n]["deletion_auc"] for n in CAM_METHODS])
    )
    return out


def main() -> None:
    seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2,3,4").split(",")]
    for seed in seeds:
        row = {k: round(float(v), 3) for k, v in margins(seed).items()}
        print(json.dumps({"seed": seed, "xla_flags": os.environ.get("XLA_FLAGS", ""), **row}))


if __name__ == "__main__":
    main()
