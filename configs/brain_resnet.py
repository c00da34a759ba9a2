"""Brain tumour MRI, binary (tumour vs no tumour), ResNet50, the paper's settings.

  python -m data_prep.build --dataset=brain_tumor_mri --src=RAW/brain_tumor_mri --out=prepared/brain_binary --label_map=binary
  python -m xmedjax.main --config=configs/brain_resnet.py --workdir=runs/brain_resnet

ImageNet weights (ARCH=resnet50), resuming and the other modes: configs/__init__.py.
"""

import configs


def get_config():
    return configs.paper_config("resnet50", "prepared/brain_binary")
