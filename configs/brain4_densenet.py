"""Brain tumour MRI, 4 classes (glioma, meningioma, pituitary, no tumour), DenseNet121, the paper's settings.

  python -m data_prep.build --dataset=brain_tumor_mri --src=RAW/brain_tumor_mri --out=prepared/brain_4class --label_map=multiclass
  python -m xmedjax.main --config=configs/brain4_densenet.py --workdir=runs/brain4_densenet

ImageNet weights (ARCH=densenet121), resuming and the other modes: configs/__init__.py.
"""

import configs


def get_config():
    return configs.paper_config("densenet121", "prepared/brain_4class")
