"""Brain tumour MRI, the 4 classes (glioma, meningioma, no tumour, pituitary), at laptop
scale: the paper's open question 3, from scratch on a 2-core CPU.

RAW is the folder holding the raw downloads as Kaggle/figshare unzip them; ARCH is
resnet50 (the default) or densenet121: `--config=configs/brain4_cpu.py:densenet121`.
Width and resolution: `configs.CPU_SCALE`; results: docs/RESULTS.md, "Real data on one CPU".
From the raw Kaggle folders (boxes borrowed as in configs/brain_cpu.py):

  python -m data_prep.build --dataset=brain_tumor_mri --src=RAW/brain_tumor_mri \
      --out=prepared/brain4_cpu --label_map=multiclass --dedup_test \
      --annotations_from=RAW/brain_tumor_boxes
  python -m xmedjax.main --config=configs/brain4_cpu.py:ARCH --workdir=runs/brain4_cpu_ARCH
  # the external tumours (any type): "any tumour" sensitivity, localisation, reliance
  python -m xmedjax.main --config=configs/brain4_cpu.py:ARCH --workdir=runs/brain4_cpu_ARCH \
      --config.mode=predict --config.predict.folder=RAW/br35h_tumours/images \
      --config.predict.annotations=RAW/br35h_tumours/annotations_via.json \
      --config.predict.negative_class=notumor

Heatmaps explain the predicted class; localisation is scored on the tumour images whose
box was borrowed. On the external folder, `negative_class` adds `any_lesion` to
explain_quality_folder.json (a tumour of any type against notumor) and the maps explain
each slice's most probable tumour class.
"""

import configs


def get_config(arch: str = "resnet50"):
    return configs.cpu_config(arch, "prepared/brain4_cpu")
