"""Saliency quality metrics: hand-checked pieces, then validation on the phantoms.

The phantom test trains a narrow ResNet50 (width 0.125, 64 px) on brain phantoms, whose
lesion masks are known, for a few hundred Adam steps, and checks that the CAMs localise
the lesion far better than seeded random maps and that randomising the weights destroys
their maps (Adebayo et al.'s sanity check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from phantom_training import train_phantom_model, unit_images
from scipy import stats
from test_cams import TinyCam

from data_prep import phantoms
from xmedjax.explain import quality
from xmedjax.explain.cams import CAM_METHODS, METHODS, auto_cam_layer, compute_methods
from xmedjax.models import create_model

# ----------------------------------------------------------------------------- by hand


def test_localisation_scores_by_hand():
    maps = np.zeros((2, 4, 4))
    maps[0, 1, 1] = 1.0  # peak inside the mask
    maps[0, 3, 3] = 0.5
    maps[1, 0, 0] = 1.0  # peak outside
    maps[1, 1, 2] = 1.0 - 1e-6
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 1:3, 1:3] = True
    np.testing.assert_array_equal(quality.pointing_game(maps, masks), [1.0, 0.0])
    np.testing.assert_allclose(
        quality.energy_in_mask(maps, masks), [1.0 / 1.5, (1 - 1e-6) / (2 - 1e-6)]
    )
    # threshold 0.5: image 0 predicts {(1,1), (3,3)}: IoU 1 / 5; image 1 {(0,0), (1,2)}: 1 / 5
    np.testing.assert_allclose(quality.iou(maps, masks, 0.5), [0.2, 0.2])
    # one pixel of tolerance brings (0, 0) next to the mask (diagonal neighbours don't count)
    assert quality.pointing_game(maps[1:], masks[1:], tolerance=1)[0] == 0.0
    assert quality.pointing_game(maps[1:], masks[1:], tolerance=2)[0] == 1.0
    empty = quality.localisation_scores(maps, np.zeros_like(masks))
    assert empty["n_localisation"] == 0


def test_masks_from_boxes_and_uint8():
    masks = quality.boxes_to_masks(np.array([[1, 0, 3, 2]]), (4, 4))
    assert masks[0].sum() == 4 and masks[0, 0, 1] and masks[0, 1, 2] and not masks[0, 2, 1]
    np.testing.assert_array_equal(
        quality.binarize_masks((masks * 255).astype(np.uint8)[..., None]), masks
    )
    np.testing.assert_array_equal(quality.binarize_masks(masks.astype(np.float32)), masks)


def test_spearman_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((3, 8, 8))
    b = a + 0.3 * rng.random((3, 8, 8))
    want = [stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(quality.spearman(a, b), want, rtol=1e-10)
    np.testing.assert_allclose(quality.spearman(a, a), 1.0)
    np.testing.assert_allclose(quality.spearman(a, -a), -1.0)
    # a constant map shares no ranking with a real one, and all of it with another constant one
    np.testing.assert_array_equal(quality.spearman(np.zeros((1, 4, 4)), a[:1, :4, :4]), [0.0])
    np.testing.assert_array_equal(quality.spearman(np.zeros((1, 4, 4)), np.ones((1, 4, 4))), [1.0])
    np.testing.assert_allclose(quality.ssim(a, a), 1.0)
    assert np.all(quality.ssim(a, rng.random((3, 8, 8))) < 0.5)
    summary = quality.compare_maps(a, b)
    assert summary["spearman"] == pytest.approx(np.mean(want))


def test_deletion_insertion_curves_by_hand():
    # logits = mean(A^2) W + b with A = relu(x): a brighter image scores higher for class 0
    graphdef, state = nnx.split(TinyCam(np.ones(1), np.array([[4.0, 0.0]]), np.zeros(2)))
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 2:4, 2:4] = 3.0
    maps = np.zeros((1, 8, 8), np.float32)
    maps[0, 2:4, 2:4] = 1.0  # the bright square first
    targets = jnp.zeros(1, jnp.int32)
    d_auc, i_auc, d_curve, i_curve = quality.deletion_insertion_fn(
        graphdef, state, jnp.asarray(x), jnp.asarray(maps), targets, steps=4
    )
    d_curve, i_curve = np.asarray(d_curve)[:, 0], np.asarray(i_curve)[:, 0]
    blurred = np.asarray(quality.gaussian_blur(jnp.asarray(x), 1.0))

    def prob(img):
        s0 = 4.0 * np.mean(np.maximum(img, 0) ** 2)
        return 1.0 / (1.0 + np.exp(-s0))

    assert d_curve[0] == pytest.approx(prob(x), rel=1e-5)  # nothing deleted yet
    assert d_curve[-1] == pytest.approx(prob(blurred), rel=1e-5)  # all blurred
    assert i_curve[0] == pytest.approx(prob(blurred), rel=1e-5)
    assert i_curve[-1] == pytest.approx(prob(x), rel=1e-5)
    # after the first quarter: 16 pixels, the 4 bright ones first, then ties in raster order
    top = np.zeros(64, bool)
    top[np.argsort(-maps[0].ravel(), kind="stable")[:16]] = True
    first = np.where(top.reshape(8, 8, 1), blurred[0], x[0])
    assert d_curve[1] == pytest.approx(prob(first[None]), rel=1e-5)
    trapezoid = (d_curve.sum() - 0.5 * (d_curve[0] + d_curve[-1])) / 4
    assert float(d_auc[0]) == pytest.approx(trapezoid, rel=1e-6)
    assert float(i_auc[0]) > float(d_auc[0])


def test_randomization_stages_go_from_the_head_down():
    graphdef, state = nnx.split(create_model("resnet50", 2, width=0.0625))
    assert quality.randomization_stages(graphdef, state) == [
        "fc",
        "layer4",
        "layer3",
        "layer2",
        "layer1",
        "bn1",
        "conv1",
    ]
    dmodel = nnx.eval_shape(lambda: create_model("densenet121", 2, width=0.0625))  # paths only
    stages = quality.randomization_stages(*nnx.split(dmodel))
    assert stages[:4] == [
        "classifier",
        "features.norm5",
        "features.denseblock4",
        "features.transition3",
    ]
    assert set(stages[-2:]) == {"features.conv0", "features.norm0"}
    # the order explain_quality.json has always listed (stem groups in name order)
    assert stages == [
        "classifier",
        "features.norm5",
        "features.denseblock4",
        "features.transition3",
        "features.denseblock3",
        "features.transition2",
        "features.denseblock2",
        "features.transition1",
        "features.denseblock1",
        "features.conv0",
        "features.norm0",
    ]
    assert quality.randomization_stages(dmodel) == stages
    # every parameter belongs to exactly one stage, so the cascade's end randomises them all
    for model in (nnx.merge(graphdef, state), dmodel):
        prefixes = [tuple(s.split(".")) for s in quality.randomization_stages(model)]
        for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            parts = tuple(map(str, path))
            assert sum(parts[: len(p)] == p for p in prefixes) == 1, path
    randomized = quality.randomize_stages(state, ["fc", "layer4"], seed=0)
    before, after = dict(nnx.to_flat_state(state)), dict(nnx.to_flat_state(randomized))
    for path, var in before.items():
        same = np.array_equal(var.get_value(), after[path].get_value())
        changed_kernel = path[0] in ("fc", "layer4") and var.get_value().ndim >= 2
        assert same != changed_kernel, path


def test_quality_subset_keeps_the_first_lesion_images():
    masks = np.zeros((4, 2, 2), np.float32)
    masks[[0, 2, 3], 0, 0] = 1.0  # image 1 has an empty mask, image 3 is padding
    batch = {
        "image": np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1) * np.ones((1, 2, 2, 1)),
        "label": np.array([1, 0, 1, 1]),
        "mask": masks,
    }
    valid = np.array([True, True, True, False])
    subset = quality.QualitySubset(n_images=3, fit_images=2)
    assert subset.arrays() is None
    subset.add(batch, valid)
    got = subset.arrays()
    assert got["images"][:, 0, 0, 0].tolist() == [0.0, 2.0] and got["masks"].dtype == bool
    subset.add(batch, valid)  # one more lesion image fills it; the fit set is already full
    got = subset.arrays()
    assert got["images"][:, 0, 0, 0].tolist() == [0.0, 2.0, 0.0] and subset.has_masks
    fit_images, fit_labels = subset.fit_arrays()
    assert fit_labels.tolist() == [1, 0, 1] and len(fit_images) == 3  # whole valid batches
    no_masks = quality.QualitySubset(n_images=2)
    no_masks.add({k: v for k, v in batch.items() if k != "mask"}, valid)
    assert no_masks.arrays()["masks"] is None and no_masks.arrays()["labels"].tolist() == [1, 0]
    assert no_masks.fit_arrays()[1].size == 0


def test_cascading_randomization_of_one_method_or_several():
    rng = np.random.default_rng(0)
    graphdef, state = nnx.split(TinyCam(np.ones(3), rng.normal(size=(3, 2)), np.zeros(2)))
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 1)), jnp.float32)
    targets = jnp.array([0, 1], jnp.int32)
    stages = ["w", "b", "k"]  # TinyCam declares no ModelSpec: the cascade order is given
    one = quality.cascading_randomization(
        METHODS["hirescam"], graphdef, state, x, targets, seed=3, stages=stages
    )
    assert [entry["stage"] for entry in one] == stages
    several = quality.cascading_randomization(
        compute_methods,
        graphdef,
        state,
        x,
        targets,
        seed=3,
        stages=stages,
        cuts=(1, len(stages)),
        names=("hirescam", "random"),
    )
    assert set(several) == {"hirescam", "random"}
    for got, want in zip(several["hirescam"], (one[0], one[-1])):
        assert got["stage"] == want["stage"]
        assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-6)
    assert [entry["spearman"] for entry in several["random"]] == [1.0, 1.0]


def test_random_baseline_is_seeded_and_model_free():
    graphdef, state = nnx.split(TinyCam(np.ones(1), np.ones((1, 2)), np.zeros(2)))
    x = jnp.zeros((3, 8, 8, 1))
    one = METHODS["random"](graphdef, state, x, None, seed=1)
    again = METHODS["random"](
        graphdef, quality.randomize_stages(state, ["w"], seed=5), x, None, seed=1
    )
    np.testing.assert_array_equal(one.maps, again.maps)
    assert not np.allclose(one.maps[0], one.maps[1])
    assert not np.allclose(one.maps, METHODS["random"](graphdef, state, x, None, seed=2).maps)


# ----------------------------------------------------------------------------- phantoms


@pytest.fixture(scope="module")
def phantom_model():
    """A narrow ResNet50 trained on brain phantoms (64 px, unit-scaled), ~45-50 s on 2 cores."""
    train = phantoms.generate("brain", 512, 64, seed=11)
    test = phantoms.generate("brain", 96, 64, seed=12)
    graphdef, state = train_phantom_model(train["images"], train["labels"])
    xt = unit_images(test["images"])
    logits = np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, xt))
    lesion = test["labels"] == 1
    return dict(
        graphdef=graphdef,
        state=state,
        accuracy=float(np.mean(np.argmax(logits, 1) == test["labels"])),
        images=xt[lesion][:32],
        labels=test["labels"][lesion][:32],
        masks=test["masks"][lesion][:32],
        all_images=xt[:64],
        all_labels=test["labels"][:64],
    )


@pytest.mark.slow
def test_cams_on_phantoms_localise_far_above_random_and_fail_when_weights_are_randomised(
    phantom_model,
):
    m = phantom_model
    assert m["accuracy"] > 0.85, m["accuracy"]
    layer = auto_cam_layer(m["graphdef"], m["state"], (64, 64, 1))
    assert layer == "layer2"  # layer4 is 2x2 at 64 px
    names = (*CAM_METHODS, "random")
    scores = quality.score_methods(
        m["graphdef"],
        m["state"],
        m["images"],
        m["labels"],
        m["masks"],
        names,
        method_opts={"scorecam": {"chunk": 32}},
        faithfulness=True,
        steps=8,
        cascade="ends",
        layer=layer,
    )
    rnd = scores["random"]
    keys = ("pointing_game", "energy_in_mask", "sanity_randomization_spearman", "deletion_auc")
    summary = "\n".join(f"{k}: {[round(v[s], 3) for s in keys]}" for k, v in scores.items())
    # Localisation at layer2 (8x8). What this asserts held over seeds 0-4 and seeds 2 and 4
    # under XLA_FLAGS=--xla_cpu_max_isa=AVX (another CPU's rounding), twice: with XLA's own
    # convolution gradients (stop 18) and with the matrix-product kernel gradients, BatchNorm
    # and max-pool backward of issue 14 (benchmarks/phantom_margins.py; benchmarks/NOTES.md,
    # "Phantom margins"). Worst run against each bound:
    #   energy in mask over random's: HiResCAM 2.00x (bound 1.5x), LayerCAM 1.95x (1.4x),
    #   the mean of Score-CAM, HiResCAM and LayerCAM 2.18x (1.5x);
    #   sanity (Spearman after randomising every layer): largest 0.71 (bound 0.9), largest
    #   mean over the CAMs 0.54 (bound 0.7);
    #   deletion AUC, random's minus HiResCAM's 0.16 (bound 0.05), minus the CAMs' mean 0.10
    #   (bound 0).
    # Not asserted, because it does not hold on every run: Score-CAM's pointing game. It led
    # on 6 of 7 runs (0.47-0.84 above random) and fell to 0.03 above random on seed 2 with the
    # new gradients (energy 1.37x), the knife edge that failed on another CPU before. Nor
    # Grad-CAM and its channel-weighted kin: at layer2 the gradient changes sign across
    # positions (|mean_hw G| / mean_hw |G| = 0.11-0.15), so the one averaged weight per
    # channel is set by the positions without the lesion (`cams.cam_layer_caveat`).
    rnd_energy = rnd["energy_in_mask"]
    for name, factor in (("hirescam", 1.5), ("layercam", 1.4)):
        assert scores[name]["energy_in_mask"] >= factor * rnd_energy, summary
    per_position = np.mean(
        [scores[n]["energy_in_mask"] for n in ("scorecam", "hirescam", "layercam")]
    )
    assert per_position >= 1.5 * rnd_energy, summary
    for name in CAM_METHODS:
        s = scores[name]
        # randomising every layer destroys the map (in part: at layer2 a random network's
        # features still follow the image, as Adebayo et al. found); a model-free map keeps 1
        assert s["sanity_randomization_spearman"] < 0.9, summary
    assert rnd["sanity_randomization_spearman"] == pytest.approx(1.0)
    assert np.mean([scores[n]["sanity_randomization_spearman"] for n in CAM_METHODS]) < 0.7, summary
    # Faithfulness: deleting by the maps' order drops the score faster than deleting at random.
    assert scores["hirescam"]["deletion_auc"] < rnd["deletion_auc"] - 0.05, summary
    deletion = np.mean([scores[n]["deletion_auc"] for n in CAM_METHODS])
    assert deletion < rnd["deletion_auc"], summary


@pytest.mark.slow
def test_input_attributions_on_phantoms(phantom_model):
    m = phantom_model
    names = ("integrated_gradients", "smoothgrad", "random")
    scores = quality.score_methods(
        m["graphdef"],
        m["state"],
        m["images"],
        m["labels"],
        m["masks"],
        names,
        method_opts={"integrated_gradients": {"steps": 8}, "smoothgrad": {"samples": 8}},
        faithfulness=False,
        sanity=False,
    )
    # Measured over seeds 0-4 (400 steps) and seeds 0/2/4 under XLA_FLAGS=--xla_cpu_max_isa=AVX:
    # pointing game minus random's, integrated gradients 0.66-1.0, SmoothGrad (8 samples)
    # 0.25 (AVX seed 4) to 0.78.
    rnd = scores["random"]["pointing_game"]
    assert scores["integrated_gradients"]["pointing_game"] >= rnd + 0.4, scores
    assert scores["smoothgrad"]["pointing_game"] >= rnd + 0.15, scores


@pytest.mark.slow
def test_label_randomisation_with_a_head_refit(phantom_model):
    m = phantom_model
    with pytest.raises(ValueError):  # one class only: shuffling changes nothing
        quality.shuffled_label_head(m["graphdef"], m["state"], m["images"], m["labels"], seed=0)
    shuffled = quality.shuffled_label_head(
        m["graphdef"], m["state"], m["all_images"], m["all_labels"], seed=0
    )
    before, after = dict(nnx.to_flat_state(m["state"])), dict(nnx.to_flat_state(shuffled))
    changed = {p for p in before if not np.array_equal(before[p].get_value(), after[p].get_value())}
    assert changed == {("fc", "kernel"), ("fc", "bias")}
    scores = quality.score_methods(
        m["graphdef"],
        m["state"],
        m["images"],
        m["labels"],
        None,
        ("hirescam", "random"),
        faithfulness=False,
        sanity=False,
        label_state=shuffled,
        label_model="head refit",
        layer="layer2",
    )
    assert scores["random"]["sanity_label_spearman"] == pytest.approx(1.0)
    assert scores["hirescam"]["sanity_label_spearman"] < 0.9
    assert scores["hirescam"]["sanity_label_model"] == "head refit"
