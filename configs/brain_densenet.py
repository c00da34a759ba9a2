"""Brain tumour MRI, binary (tumour vs no tumour), DenseNet121, the paper's settings.

  python -m data_prep.build --dataset=brain_tumor_mri --src=RAW/brain_tumor_mri --out=prepared/brain_binary --label_map=binary
  python -m xmedjax.main --config=configs/brain_densenet.py --workdir=runs/brain_densenet

ImageNet weights (ARCH=densenet121), resuming and the other modes: configs/__init__.py.
"""

import configs


def get_config():
    return configs.paper_config("densenet121", "prepared/brain_binary")
