"""Every name a config chooses from, defined once; imports nothing.

`xmedjax.config_checks` validates a config against these tuples before JAX, Flax or the
models load. The modules that implement each choice take their names from here or are
tested against them (tests/test_configs.py, tests/test_cams.py): the saliency registry
(`xmedjax.explain.cams.METHODS`), the input pipeline's normalisations, the models'
architectures, the optimiser factory and the modes of `xmedjax.train`.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- config enums
MODES = ("train", "evaluate", "explain", "predict")
ARCHS = ("densenet121", "resnet50")
DTYPES = ("float32", "bfloat16")
DATASETS = ("prepared", "phantoms")
PHANTOM_KINDS = ("brain", "chest")
NORMALIZATIONS = ("imagenet", "unit", "per_image")
OPTIMIZERS = ("adam", "adamw", "sgd")
CLASS_WEIGHTINGS = ("none", "balanced")
BEST_METRICS = ("val_loss", "val_accuracy", "val_auc_roc")
THRESHOLDS = ("youden", "0.5")
HEADS = ("reinit", "strict")
DISTRIBUTED = ("auto", "on", "off")
# Lesion annotations of a predict/explain folder (`data_prep.annotations.FORMATS` + auto).
ANNOTATION_FORMATS = ("auto", "via", "coco", "yolo", "masks")

# ----------------------------------------------------------------------------- saliency methods
# The CAMs that need only the target activation and its gradient (one backward pass).
GRADIENT_CAMS = ("gradcam", "gradcampp", "hirescam", "layercam", "xgradcam")
# The CAMs that weight each channel by ONE number (a spatial average of its gradient):
# exact at the model's own target (global pooling, then a linear head: the gradient is the
# same at every position), unreliable at an earlier layer, whose gradient changes sign from
# position to position (`cams.cam_layer_caveat`, benchmarks/NOTES.md).
CHANNEL_WEIGHTED_CAMS = ("gradcam", "gradcampp", "xgradcam")
# Every method that maps a CAM target layer (the ones a `layer=` option applies to).
CAM_METHODS = (*GRADIENT_CAMS, "scorecam")
# Input attributions (gradients with respect to the pixels).
ATTRIBUTIONS = ("integrated_gradients", "smoothgrad")
# The model-free baseline: seeded uniform maps.
RANDOM = "random"
# Every saliency method, in the registry's order (`xmedjax.explain.cams.METHODS`).
SALIENCY_METHODS = (*CAM_METHODS, *ATTRIBUTIONS, RANDOM)
# What explain_quality.json scores when config.explain.quality_methods is empty: all of them.
QUALITY_METHODS = SALIENCY_METHODS
