"""Brain tumour MRI, binary (tumour vs no tumour), DenseNet121, the paper's settings.

  python -m data_prep.build --dataset=brain_tumor_mri --src=RAW/brain_tumor_mri --out=prepared/brain_binary --label_map=binary
  python -m xmedjax.main --config=configs/brain_densenet.py --workdir=runs/brain_densenet

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
    c.data.data_dir = "prepared/brain_binary"
    return c
