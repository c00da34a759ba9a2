"""Chest X-ray pneumonia, binary (NORMAL vs PNEUMONIA), ResNet50, the paper's settings.

  python -m data_prep.build --dataset=chest_xray --src=RAW/chest_xray --out=prepared/chest_xray
  python -m xmedjax.main --config=configs/chest_resnet.py --workdir=runs/chest_resnet

From scratch as written; to start from ImageNet weights (torchvision file, converted once):
  python -m xmedjax.convert --arch=resnet50 --src=PATH/TO/resnet50.pth --out=weights/resnet50_imagenet
  ... --config.init.checkpoint=weights/resnet50_imagenet
Rerun the same command to resume an interrupted run; --config.mode=evaluate|explain|predict
(with --config.predict.folder=DIR) reuse WORKDIR's best checkpoint.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.arch = "resnet50"
    c.data.dataset = "prepared"
    c.data.data_dir = "prepared/chest_xray"
    return c
