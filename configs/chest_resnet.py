"""Chest X-ray pneumonia, binary (NORMAL vs PNEUMONIA), ResNet50, the paper's settings.

  python -m data_prep.build --dataset=chest_xray --src=RAW/chest_xray --out=prepared/chest_xray
  python -m xmedjax.main --config=configs/chest_resnet.py --workdir=runs/chest_resnet

ImageNet weights (ARCH=resnet50), resuming and the other modes: configs/__init__.py.
"""

import configs


def get_config():
    return configs.paper_config("resnet50", "prepared/chest_xray")
