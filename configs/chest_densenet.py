"""Chest X-ray pneumonia, binary (NORMAL vs PNEUMONIA), DenseNet121, the paper's settings.

  python -m data_prep.build --dataset=chest_xray --src=RAW/chest_xray --out=prepared/chest_xray
  python -m xmedjax.main --config=configs/chest_densenet.py --workdir=runs/chest_densenet

From scratch as written; to start from ImageNet weights (torchvision file, converted once):
  python -m xmedjax.convert --arch=densenet121 --src=PATH/TO/densenet121.pth --out=weights/densenet121_imagenet
  ... --config.init.checkpoint=weights/densenet121_imagenet
Rerun the same command to resume an interrupted run; --config.mode=evaluate|explain|predict
(with --config.predict.folder=DIR) reuse WORKDIR's best checkpoint.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model.arch = "densenet121"
    c.data.dataset = "prepared"
    c.data.data_dir = "prepared/chest_xray"
    return c
