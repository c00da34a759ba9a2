"""Saliency maps and their quality: the Grad-CAM family, attributions, metrics, export.

Every method is in `METHODS` under one signature,
`fn(graphdef, state, images, targets, **opts) -> CamResult(raw, maps, logits, targets)`;
`compute_methods` runs several on one batch sharing the gradient CAMs' backward pass.
The `explain`/`predict` modes' work lives in `xmedjax.explain.run`; the comparison command is
`python -m xmedjax.compare`. Nothing here imports the training modules (train, runs, modes).
"""

from xmedjax.explain.attribution import integrated_gradients_fn, smoothgrad_fn
from xmedjax.explain.cams import (
    CAM_METHODS,
    METHODS,
    auto_cam_layer,
    compute_methods,
    gradcampp_fn,
    hirescam_fn,
    layercam_fn,
    random_fn,
    scorecam_fn,
    xgradcam_fn,
)
from xmedjax.explain.capture import TargetCapture, capture_target_gradients, forward_with_activation
from xmedjax.explain.export import report_section_html
from xmedjax.explain.gradcam import CamResult, grad_cam, grad_cam_fn

__all__ = [
    "CAM_METHODS",
    "CamResult",
    "METHODS",
    "TargetCapture",
    "auto_cam_layer",
    "capture_target_gradients",
    "compute_methods",
    "forward_with_activation",
    "grad_cam",
    "grad_cam_fn",
    "gradcampp_fn",
    "hirescam_fn",
    "integrated_gradients_fn",
    "layercam_fn",
    "random_fn",
    "report_section_html",
    "scorecam_fn",
    "smoothgrad_fn",
    "xgradcam_fn",
]
