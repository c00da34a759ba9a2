"""Makes tests/data/pgc_reference.npz: pytorch-grad-cam 1.5.7 maps on the parity weights.

Run OUTSIDE the project venv, in one with torch and pytorch-grad-cam:

    python3 -m venv /tmp/pgc
    /tmp/pgc/bin/pip install torch==2.14.1 torchvision==0.29.1 grad-cam==1.5.7
    /tmp/pgc/bin/python tests/data/make_pgc_reference.py

Models: torchvision resnet50 / densenet121 with 1000 classes and the deterministic recipe
weights of tests/parity.py (numpy only, so it is imported from here), eval mode, float32
CPU. Targets: the parity goldens' argmax classes. ResNet50's target layer is `layer4`;
DenseNet121's is an out-of-place ReLU after `features` (torchvision applies that ReLU in
place in `forward`, which corrupts hooks on `features`).

Keys: `{arch}_{method}_{size}` (2, size, size), what each pytorch-grad-cam class returns
(cam per image, OpenCV-resized to the input and min-max scaled), `{arch}_target_{size}`,
for method in gradcampp, hirescam, layercam, xgradcam (sizes 64 and 128) and scorecam
(size 64).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torchvision
from pytorch_grad_cam import GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import parity  # noqa: E402

METHODS = {
    "gradcampp": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "scorecam": ScoreCAM,
}
SIZES = {
    "gradcampp": (64, 128),
    "hirescam": (64, 128),
    "layercam": (64, 128),
    "xgradcam": (64, 128),
    "scorecam": (64,),
}


class DenseNetOutOfPlace(torch.nn.Module):
    """torchvision densenet121's forward with its final ReLU as a separate, out-of-place module."""

    def __init__(self, net: torchvision.models.DenseNet):
        super().__init__()
        self.features = net.features
        self.relu = torch.nn.ReLU(inplace=False)
        self.classifier = net.classifier

    def forward(self, x):
        out = self.relu(self.features(x))
        out = torch.nn.functional.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))


def build(arch: str):
    net = getattr(torchvision.models, arch)(weights=None)
    state = {k: torch.from_numpy(v) for k, v in parity.recipe_state_dict(arch).items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (
        missing,
        unexpected,
    )
    if arch == "densenet121":
        net = DenseNetOutOfPlace(net)
        layer = net.relu
    else:
        layer = net.layer4
    return net.eval(), layer


def main() -> None:
    torch.manual_seed(0)
    out = {}
    for arch in ("resnet50", "densenet121"):
        net, layer = build(arch)
        for size in (64, 128):
            x = torch.from_numpy(
                np.ascontiguousarray(parity.recipe_input(size).transpose(0, 3, 1, 2))
            )
            with torch.no_grad():
                target = net(x).argmax(1).numpy()
            if size == 64:
                assert np.array_equal(target, parity.golden(arch)["target_64"])
            out[f"{arch}_target_{size}"] = target.astype(np.int32)
            for name, cls in METHODS.items():
                if size not in SIZES[name]:
                    continue
                with cls(model=net, target_layers=[layer]) as cam:
                    if name == "scorecam":
                        cam.batch_size = 64
                    maps = cam(
                        input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in target]
                    )
                out[f"{arch}_{name}_{size}"] = np.asarray(maps, np.float32)
                print(arch, size, name, out[f"{arch}_{name}_{size}"].shape, flush=True)
    out["versions"] = np.array([torch.__version__, torchvision.__version__, "grad-cam 1.5.7"])
    np.savez_compressed(os.path.join(HERE, "pgc_reference.npz"), **out)


if __name__ == "__main__":
    main()
