"""Convert a torchvision/timm checkpoint into an Orbax checkpoint of xmedjax weights.

    python -m xmedjax.convert --arch=densenet121 --src=densenet121-a639ec97.pth \
        --out=weights/densenet121_imagenet
    python -m xmedjax.convert --arch=resnet50 --src=model.safetensors \
        --out=weights/resnet50_grey2 --num_classes=2 --in_channels=1

A config then names the output as `config.init.checkpoint`. Nothing is downloaded.
"""

from __future__ import annotations

from absl import app, flags

from xmedjax import cli_errors
from xmedjax.models import ARCHITECTURES, create_model, load_torchvision_weights
from xmedjax.models.convert import read_state_dict
from xmedjax.models.weights_io import save_weights

_ARCH = flags.DEFINE_enum("arch", None, sorted(ARCHITECTURES), "Model architecture.")
_SRC = flags.DEFINE_string(
    "src", None, "A .safetensors or .pth checkpoint with torchvision/timm keys."
)
_OUT = flags.DEFINE_string(
    "out", None, "Output directory (local or gs://) for the Orbax checkpoint."
)
_NUM_CLASSES = flags.DEFINE_integer(
    "num_classes", 1000, "Classifier size; other than the checkpoint's re-initialises the head."
)
_IN_CHANNELS = flags.DEFINE_enum(
    "in_channels", "3", ["1", "3"], "1 sums the stem's RGB kernels for greyscale input."
)


@cli_errors.one_line_errors("xmedjax.convert", expected=(ImportError,))
def main(argv: list[str]) -> None:
    """The command: a missing or unreadable file is one line (the traceback under -v=1)."""
    del argv
    weights = read_state_dict(_SRC.value)  # before building the model: fail fast
    model = create_model(_ARCH.value, _NUM_CLASSES.value, in_channels=int(_IN_CHANNELS.value))
    head = "strict" if _NUM_CLASSES.value == 1000 else "reinit"
    load_torchvision_weights(model, weights, head=head)
    meta = {
        "arch": _ARCH.value,
        "num_classes": _NUM_CLASSES.value,
        "in_channels": int(_IN_CHANNELS.value),
        "source": _SRC.value,
        "head": head,
    }
    out = save_weights(model, _OUT.value, meta)
    print(
        f"wrote {out} ({_ARCH.value}, {_NUM_CLASSES.value} classes, {_IN_CHANNELS.value} input channel(s))"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["arch", "src", "out"])
    app.run(main)
