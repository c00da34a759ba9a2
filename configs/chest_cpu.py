"""Paediatric chest X-ray, pneumonia vs normal, at laptop scale: from scratch on a 2-core CPU.

RAW is the folder holding the raw downloads as Kaggle/figshare unzip them; ARCH is
resnet50 (the default) or densenet121: `--config=configs/chest_cpu.py:densenet121`.
Width and resolution: `configs.CPU_SCALE`; results: docs/RESULTS.md, "Real data on one CPU".
The official val split holds 16 images, so val is carved from train (15%, seeded); the
leak-free test split (test_dedup) drops test images with a copy in train or whose patient id
(`personN_...` in the file name) also appears in train. From the raw Kaggle folder:

  python -m data_prep.build --dataset=chest_xray --src=RAW/chest_xray \
      --out=prepared/chest_cpu --dedup_test
  python -m xmedjax.main --config=configs/chest_cpu.py:ARCH --workdir=runs/chest_cpu_ARCH

There are no lesion outlines for this set: explain_quality.json has faithfulness and sanity
checks, no localisation.
"""

import configs


def get_config(arch: str = "resnet50"):
    return configs.cpu_config(arch, "prepared/chest_cpu")
