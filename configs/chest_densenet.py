"""Chest X-ray pneumonia, binary (NORMAL vs PNEUMONIA), DenseNet121, the paper's settings.

  python -m data_prep.build --dataset=chest_xray --src=RAW/chest_xray --out=prepared/chest_xray
  python -m xmedjax.main --config=configs/chest_densenet.py --workdir=runs/chest_densenet

ImageNet weights (ARCH=densenet121), resuming and the other modes: configs/__init__.py.
"""

import configs


def get_config():
    return configs.paper_config("densenet121", "prepared/chest_xray")
