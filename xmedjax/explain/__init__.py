"""Saliency maps and their quality: the Grad-CAM family, attributions, metrics, export."""

from xmedjax.explain.capture import TargetCapture, capture_target_gradients, forward_with_activation
from xmedjax.explain.gradcam import CamResult, grad_cam, grad_cam_fn

__all__ = [
    "CamResult",
    "TargetCapture",
    "capture_target_gradients",
    "forward_with_activation",
    "grad_cam",
    "grad_cam_fn",
]
