"""The real-data recipe's tools: intensity augmentation, per-image standardisation, the
laptop-scale configs, the leak-free split in metrics.json, command timings and the summary."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from xmedjax import config_checks, input_pipeline, intensity, lesion_mix, metrics, modes, summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = dict(
    resolution_range=0.5,
    blur_sigma=1.0,
    gamma_range=0.5,
    contrast_range=0.3,
    brightness_range=0.1,
    noise_std=0.05,
)


def _image(seed=0, size=48):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2) * 150.0
    return np.clip(head + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)


def test_intensity_params_validate_and_all_zero_is_none():
    assert intensity.IntensityParams.from_mapping({}) is None
    assert intensity.IntensityParams.from_mapping({"rotation_range": 20.0}) is None  # not its key
    assert intensity.IntensityParams.from_mapping({"gamma_range": 0.2}).gamma_range == 0.2
    with pytest.raises(ValueError, match="augment.noise_std"):
        intensity.IntensityParams(noise_std=-0.1)
    with pytest.raises(ValueError, match="contrast_range"):
        intensity.IntensityParams(contrast_range=1.0)


@pytest.mark.parametrize("key", sorted(ALL))
def test_each_intensity_transform_changes_pixels_stays_in_range_and_is_seeded(key):
    x = _image().astype(np.float32) / 255
    p = intensity.IntensityParams(**{key: ALL[key]})
    outs = [intensity.augment(x, np.random.default_rng(s), p) for s in range(6)]
    for out in outs:
        assert out.shape == x.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
    assert max(np.abs(o - x).max() for o in outs) > 1e-3  # the transform does something
    again = intensity.augment(x, np.random.default_rng(3), p)
    np.testing.assert_array_equal(again, outs[3])  # a pure function of the generator


def test_intensity_augment_keeps_colour_images_colour():
    x = np.stack([_image(s) for s in range(3)], -1).astype(np.float32) / 255
    out = intensity.augment(x, np.random.default_rng(0), intensity.IntensityParams(**ALL))
    assert out.shape == x.shape


def test_per_image_standardisation_removes_brightness_and_contrast():
    img = _image()
    brighter = np.clip(img.astype(np.int32) * 2 // 3 + 60, 0, 255).astype(np.uint8)  # affine
    a = input_pipeline.to_float(img, 1, "per_image")
    b = input_pipeline.to_float(brighter, 1, "per_image")
    assert abs(a.mean()) < 1e-5 and abs(a.std() - 1) < 1e-4
    np.testing.assert_allclose(a, b, atol=0.05)  # up to uint8 rounding of the affine map
    assert not np.allclose(input_pipeline.to_float(img, 1, "unit"), b, atol=0.05)
    flat = input_pipeline.to_float(np.full((8, 8), 7, np.uint8), 3, "per_image")
    assert np.all(flat == 0)  # a constant image: no division by zero


@pytest.mark.parametrize("normalization", ["imagenet", "unit", "per_image"])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_augmented_path_normalises_as_the_plain_path(normalization, channels):
    img = _image()
    plain = input_pipeline.to_float(img, channels, normalization)
    via_unit = input_pipeline.unit_to_float(img / np.float32(255), channels, normalization)
    np.testing.assert_allclose(via_unit, plain, atol=1e-5)


def test_train_iterator_applies_intensity_augmentation_to_images_not_masks(tmp_path):
    from data_prep import phantoms

    data = phantoms.build_phantom_dataset(
        str(tmp_path / "ph"), kind="brain", size=48, counts={"train": 8}, seed=0
    )
    pre = input_pipeline.Preprocess(48, 1, "unit")

    def batch(augment):
        it = input_pipeline.make_train_iterator(
            data, "train", global_batch_size=8, preprocess=pre, augment=augment, seed=0
        )
        return next(it)

    plain, aug = batch({}), batch({"gamma_range": 0.8, "noise_std": 0.1})
    np.testing.assert_array_equal(plain["label"], aug["label"])
    np.testing.assert_array_equal(plain["mask"], aug["mask"])
    assert np.abs(plain["image"] - aug["image"]).mean() > 0.01
    with pytest.raises(ValueError, match="unknown augment key"):
        batch({"shear_range": 0.2})


@pytest.mark.parametrize("name", ["brain_cpu", "chest_cpu", "brain4_cpu"])
@pytest.mark.parametrize("arch", ["resnet50", "densenet121"])
def test_cpu_configs_take_the_architecture_as_their_argument(name, arch):
    from ml_collections import config_flags  # noqa: F401 (the loader main uses)

    from xmedjax import cli_flags

    config = cli_flags.load_config_file(os.path.join(ROOT, "configs", f"{name}.py") + f":{arch}")
    config_checks.validate(config)
    assert config.model.arch == arch and config.data.data_dir == f"prepared/{name}"
    doc = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
    assert f"--config=configs/{name}.py" in doc and "data_prep.build" in doc


def test_cpu_config_rejects_an_unknown_architecture():
    from xmedjax import cli_flags
    from xmedjax.errors import ConfigError

    with pytest.raises(ConfigError, match="resnet50"):
        cli_flags.load_config_file(os.path.join(ROOT, "configs", "brain_cpu.py") + ":vgg16")


def test_wilson_interval():
    assert metrics.wilson_interval(0, 0) == [None, None]
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.28  # the textbook value 0.2775
    lo, hi = metrics.wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3


def test_every_further_split_is_evaluated_after_val_and_test():
    config = types.SimpleNamespace(
        data=types.SimpleNamespace(train_split="train", val_split="val", test_split="test")
    )
    info = types.SimpleNamespace(splits={"train": 9, "val": 2, "test": 3, "test_dedup": 1})
    run = types.SimpleNamespace(config=config, info=info)
    assert modes.evaluated_splits(run) == ("val", "test", "test_dedup")


def test_timed_command_records_finished_and_preempted_commands_only(tmp_path):
    from xmedjax import train

    with modes.timed_command("train", str(tmp_path), argv=["x"]):
        pass
    with pytest.raises(train.Preempted), modes.timed_command("train", str(tmp_path)):
        raise train.Preempted("stopped", 15)
    with pytest.raises(RuntimeError), modes.timed_command("predict", str(tmp_path)):
        raise RuntimeError("the work directory is busy")  # writes nothing
    lines = [json.loads(s) for s in open(tmp_path / "commands.jsonl")]
    assert [(line["mode"], line["status"]) for line in lines] == [
        ("train", "ok"),
        ("train", "Preempted"),
    ]
    assert lines[0]["seconds"] >= 0 and lines[0]["argv"] == ["x"]


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.write("".join(json.dumps(o) + "\n" for o in obj))
        else:
            json.dump(obj, f)


def _fake_run(wd, *, folder=True):
    split = {
        "n": 10,
        "accuracy": 0.9,
        "auc_roc": 0.95,
        "f1": 0.8,
        "average_precision": 0.85,
        "ci95": {"accuracy": [0.8, 1.0], "auc_roc": [0.9, 1.0]},
    }
    _write(f"{wd}/config.json", {"model": {"arch": "resnet50"}, "data": {"test_split": "test"}})
    _write(
        f"{wd}/metrics.json",
        {
            "val": split,
            "test": split,
            "test_dedup": {**split, "accuracy": 0.7, "auc_roc": None},
            "shortcut_baseline": {"accuracy": 0.99},
        },
    )
    loc = {"pointing_game": 0.5, "energy_in_mask": 0.2, "ci95": {"pointing_game": [0.3, 0.7]}}
    reliance = {"n_images": 4, "lesion_removed": {"mean_drop": 0.3}, "original": {}}
    _write(
        f"{wd}/explain_quality.json",
        {"gradcam": loc, "random": loc, "lesion_reliance": reliance, "_meta": {}},
    )
    if folder:
        _write(
            f"{wd}/explain_quality_folder.json",
            {
                "hirescam": loc,
                "detection": {"sensitivity": 0.25, "sensitivity_ci95": [0.1, 0.5]},
                "_meta": {"folder": "ext"},
            },
        )
    _write(
        f"{wd}/commands.jsonl",
        [{"mode": "train", "seconds": 600}, {"mode": "predict", "seconds": 60}],
    )


def test_summary_reads_every_figure_and_writes_nothing_into_the_runs(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _fake_run(a)
    _fake_run(b, folder=False)
    before = {p: os.path.getmtime(os.path.join(a, p)) for p in os.listdir(a)}
    s = summary.summarise({"brain_resnet50": a}, {"brain_from_chest": b})
    r = s["runs"]["brain_resnet50"]
    assert (r["accuracy"], r["accuracy_dedup"], r["auc_roc_dedup"]) == (0.9, 0.7, None)
    assert r["ci95"]["accuracy"] == [0.8, 1.0] and r["shortcut_baseline_accuracy"] == 0.99
    assert set(r["localisation"]) == {"gradcam", "random"}
    assert r["localisation"]["gradcam"]["ci95"]["pointing_game"] == [0.3, 0.7]
    assert r["lesion_reliance"]["lesion_removed"]["mean_drop"] == 0.3
    assert r["external_sensitivity"] == 0.25 and set(r["external"]["localisation"]) == {"hirescam"}
    assert r["minutes"] == 11.0
    assert s["pretraining"]["brain_from_chest"]["external"] is None
    assert "| brain_resnet50 | 0.900 [0.800, 1.000]" in summary.markdown(s)
    assert before == {p: os.path.getmtime(os.path.join(a, p)) for p in os.listdir(a)}
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        summary.run_figures(str(tmp_path))


def test_summary_of_several_seeds_means_figures_and_spans_intervals(tmp_path):
    dirs = [str(tmp_path / f"s{i}") for i in range(3)]
    for i, wd in enumerate(dirs):
        _fake_run(wd)
        with open(f"{wd}/metrics.json") as f:
            m = json.load(f)
        m["test"]["accuracy"] = 0.8 + 0.05 * i
        m["test"]["ci95"]["accuracy"] = [0.75 + 0.05 * i, 0.85 + 0.05 * i]
        _write(f"{wd}/metrics.json", m)
    s = summary.summarise({"brain_resnet50": "+".join(dirs)})
    r = s["runs"]["brain_resnet50"]
    np.testing.assert_allclose(r["accuracy"], 0.85)
    np.testing.assert_allclose(r["ci95"]["accuracy"], [0.75, 0.95])
    assert r["seeds"]["n"] == 3
    np.testing.assert_allclose(r["seeds"]["accuracy"], [0.8, 0.85, 0.9])
    assert r["details_from"] == dirs[0] and r["workdir"] == dirs
    assert r["external_sensitivity"] == 0.25 and r["auc_roc_dedup"] is None
    assert "| brain_resnet50 (3 seeds) | 0.850 [0.750, 0.950]" in summary.markdown(s)


def test_summary_prefers_any_lesion_detection_when_scored(tmp_path):
    wd = str(tmp_path / "four")
    _fake_run(wd)
    with open(f"{wd}/explain_quality_folder.json") as f:
        folder = json.load(f)
    folder["any_lesion"] = {
        "detection": {"sensitivity": 0.75},
        "lesion_reliance": {"n_images": 8, "lesion_removed": {"mean_drop": 0.4}},
    }
    _write(f"{wd}/explain_quality_folder.json", folder)
    r = summary.run_figures(wd)
    assert r["external_sensitivity"] == 0.75
    assert r["external"]["lesion_reliance"]["lesion_removed"]["mean_drop"] == 0.4
    assert set(r["external"]["localisation"]) == {"hirescam"}


# ----------------------------------------------------------------------------- lesion mix
def _blob_image(size=64, lesion=True):
    yy, xx = np.mgrid[:size, :size]
    g = np.where((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2, 100.0, 0.0)
    mask = np.zeros((size, size), np.float32)
    if lesion:
        g[20:30, 36:46] = 250.0
        mask[20:30, 36:46] = 1.0
    return g.astype(np.uint8), mask


def test_erase_fills_the_lesion_from_its_surroundings_and_leaves_the_rest():
    image, mask = _blob_image()
    out = lesion_mix.erase(image, mask, np.random.default_rng(0))
    assert abs(float(out[20:30, 36:46].mean()) - 100) < 15  # was 250: now like the tissue
    far = np.zeros_like(mask, bool)
    far[:, :16] = True
    np.testing.assert_array_equal(out[far], image[far])


def test_paste_puts_the_donor_lesion_inside_the_anatomy_with_its_mask():
    target, _ = _blob_image(lesion=False)
    donor, donor_mask = _blob_image()
    for seed in range(5):
        out, mask = lesion_mix.paste(target, donor, donor_mask, np.random.default_rng(seed))
        assert mask.sum() > 50 and out.shape == target.shape
        ys, xs = np.nonzero(mask)
        assert (target[ys, xs] > 0).mean() > 0.5  # on the anatomy, not the background
        assert out[ys, xs].mean() > target[ys, xs].mean() + 20  # the bright lesion came along
    assert (
        lesion_mix.paste(target, donor, np.zeros_like(donor_mask), np.random.default_rng(0)) is None
    )


def test_lesion_mix_params_name_the_key():
    names = ["notumor", "tumor"]
    assert lesion_mix.LesionMixParams.from_mapping({}, names) is None
    p = lesion_mix.LesionMixParams.from_mapping(
        {"lesion_erase_prob": 0.5, "lesion_negative_class": "notumor"}, names
    )
    assert (p.erase_prob, p.paste_prob, p.negative_class) == (0.5, 0.0, 0)
    with pytest.raises(ValueError, match="lesion_negative_class.*'healthy'"):
        lesion_mix.LesionMixParams.from_mapping(
            {"lesion_paste_prob": 1.0, "lesion_negative_class": "healthy"}, names
        )
    from configs import demo

    c = demo.get_config()
    c.augment.lesion_erase_prob = 0.3
    with pytest.raises(config_checks.ConfigError, match="augment.lesion_negative_class"):
        config_checks.validate(c)


def test_train_iterator_erases_and_pastes_lesions_deterministically(tmp_path):
    from data_prep import phantoms

    data = phantoms.build_phantom_dataset(
        str(tmp_path / "ph"), kind="brain", size=48, counts={"train": 16}, seed=0
    )
    pre = input_pipeline.Preprocess(48, 1, "unit")

    def batch(**mix):
        it = input_pipeline.make_train_iterator(
            data,
            "train",
            global_batch_size=16,
            preprocess=pre,
            augment={**mix, "lesion_negative_class": "notumor"},
            seed=0,
        )
        return next(it)

    plain = batch()
    erased = batch(lesion_erase_prob=1.0)
    pasted = batch(lesion_paste_prob=1.0)
    assert (plain["label"] == 1).any() and (plain["label"] == 0).any()
    assert (erased["label"] == 0).all()  # every tumour image lost its tumour
    assert not erased["mask"].any()
    assert (pasted["label"] == 1).all()  # every tumour-free image got one
    assert all(pasted["mask"][i].sum() > 0 for i in range(16))
    was_free = plain["label"] == 0
    assert np.abs(pasted["image"][was_free] - plain["image"][was_free]).max() > 0.1
    np.testing.assert_array_equal(batch(lesion_paste_prob=1.0)["image"], pasted["image"])


def test_a_run_saved_before_new_config_keys_stays_readable(tmp_path):
    from xmedjax import runs

    saved = config_checks.default_config().to_dict()
    del saved["augment"]["noise_std"]
    saved["data"]["data_dir"] = "somewhere"
    _write(str(tmp_path / "config.json"), saved)
    assert runs.read_saved_config(str(tmp_path)).augment.noise_std == 0.0  # was: "missing"
    saved = config_checks.default_config().to_dict()
    del saved["augment"]["blur_sigma"], saved["augment"]["lesion_negative_class"]
    saved["data"]["data_dir"] = "somewhere"
    saved["custom"] = {"kept": 1}
    filled = runs._with_later_defaults(saved)
    assert (
        filled["augment"]["blur_sigma"] == 0.0 and filled["augment"]["lesion_negative_class"] == ""
    )
    assert filled["data"]["data_dir"] == "somewhere" and filled["custom"] == {"kept": 1}
