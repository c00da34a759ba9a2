"""The experiment configs, shipped with the package: `import configs.demo`.

Each module has `get_config()` and a docstring with its exact commands; every one starts
from `configs.default` (the schema and the paper's hyper-parameters), which
`xmedjax.config_checks` validates against. The command line takes a file path:

  python -m xmedjax.main --config=configs/demo.py --workdir=runs/demo

The paper's configs (brain_*, chest_*, brain4_*: `paper_config`) train from scratch as
written. To start from ImageNet weights, convert the torchvision file once (ARCH is the
config's model.arch, densenet121 or resnet50) and name it on the same command:

  python -m xmedjax.convert --arch=ARCH --src=PATH/TO/ARCH.pth --out=weights/ARCH_imagenet
  python -m xmedjax.main --config=configs/NAME.py --workdir=runs/NAME \
      --config.init.checkpoint=weights/ARCH_imagenet

Rerun the same command to resume an interrupted run; --config.mode=evaluate|explain|predict
(with --config.predict.folder=DIR) reuse WORKDIR's best checkpoint.
"""


def paper_config(arch: str, data_dir: str):
    """The paper's settings (`configs.default`) for `arch` on the prepared dataset `data_dir`."""
    from configs import default

    c = default.get_config()
    c.model.arch = arch
    c.data.dataset = "prepared"
    c.data.data_dir = data_dir
    return c


# The laptop-scale recipe of configs/{brain,chest,brain4}_cpu.py: measured on a 2-core CPU
# (docs/RESULTS.md, "Real data on one CPU"), each run train + evaluate + explain + quality
# in at most 30 minutes. Widths and sizes per architecture: {arch: (width, image_size)}.
CPU_SCALE = {"resnet50": (0.25, 128), "densenet121": (0.25, 128)}
CPU_ARCHS = tuple(CPU_SCALE)


def cpu_config(arch: str, data_dir: str, *, epochs: int = 6):
    """`arch` (resnet50 | densenet121) from scratch on the prepared dataset `data_dir`, at the
    width and resolution of `CPU_SCALE`, sized for a 2-core CPU (see the cpu configs)."""
    from configs import default
    from xmedjax import names

    if arch not in CPU_SCALE:
        raise ValueError(
            f"arch must be one of {list(CPU_SCALE)} (--config=FILE.py:ARCH), got {arch!r}"
        )
    c = default.get_config()
    c.model.arch = arch
    c.model.width, c.data.image_size = CPU_SCALE[arch]
    c.data.dataset = "prepared"
    c.data.data_dir = data_dir
    c.data.channels = 1  # greyscale scans; no ImageNet weights to match
    c.data.normalization = "unit"
    c.optimizer.learning_rate = 1e-3  # from scratch; the paper's 1e-4 suits ImageNet weights
    c.training.max_epochs = epochs
    c.training.early_stopping_patience = 0  # a fixed, predictable CPU budget
    c.training.reduce_on_plateau_patience = 2
    c.training.reduce_on_plateau_factor = 0.3
    c.evaluate.bootstrap_samples = 1000
    c.explain.methods = ("gradcam", "hirescam", "layercam")
    # explain_quality.json: every CAM method and the random baseline on 64 annotated test
    # images (the input attributions, integrated gradients and SmoothGrad, would add minutes)
    c.explain.quality_methods = (*names.CAM_METHODS, names.RANDOM)
    c.explain.quality_images = 64
    return c
