"""The README demo: synthetic brain phantoms, 64 px, a narrow ResNet50, CPU in minutes.

  python -m xmedjax.main --config=configs/demo.py --workdir=runs/demo

Builds the phantom dataset into WORKDIR/data on first use, trains, evaluates the best
checkpoint on val and test (WORKDIR/metrics.json, WORKDIR/report.html) and writes Grad-CAM
and HiResCAM maps of the test split (WORKDIR/heatmaps/test_{gradcam,hirescam}.npz).
Rerunning resumes.

At 64 px the CAM layer is layer2 (8x8; the model's own is 2x2), where Grad-CAM's one
averaged gradient weight per channel does not localise the lesion and HiResCAM's
per-position weights do (README, "Is my model looking at the lesion?"); both come from the
same backward pass.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.arch = "resnet50"
    c.model.width = 0.125
    c.data.dataset = "phantoms"
    c.data.phantom_kind = "brain"
    c.data.phantom_counts = {"train": 1024, "val": 128, "test": 256}
    c.data.image_size = 64
    c.data.channels = 1
    c.optimizer.learning_rate = (
        2e-3  # the paper's 1e-4 suits ImageNet-initialised full-width models
    )
    c.training.max_epochs = 10
    c.training.early_stopping_patience = 0  # a fixed, predictable CPU budget
    c.training.reduce_on_plateau_patience = 3
    c.training.reduce_on_plateau_factor = 0.5
    c.training.checkpoint_every_steps = 50
    c.evaluate.bootstrap_samples = 500
    # explain_quality.json scores every CAM method, the input attributions and the random
    # baseline (the empty tuple means all nine) on 32 tumour images of the test split.
    c.explain.methods = ("gradcam", "hirescam")
    c.explain.quality_methods = ()
    c.explain.quality_images = 64  # 32 gives a noisy pointing game (a hit is 3 points)
    return c
