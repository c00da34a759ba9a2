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
