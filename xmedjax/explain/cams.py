"""The Grad-CAM family on the shared capture: Grad-CAM++, HiResCAM, LayerCAM, XGrad-CAM,
Score-CAM (Grad-CAM itself lives in `gradcam.py`).

Every method is a pure function of (graphdef, state, images, targets), jitted with the
graphdef static, batched with one target class per image (`targets=None` explains each
image's predicted class), and returns a `CamResult`: `raw` maps on the target
activation's grid (after the ReLU every method applies), `maps` bilinearly upsampled to the
input size and min-max scaled to [0, 1] per image, the float32 logits, and the targets.

The weightings follow pytorch-grad-cam 1.5.7 (checked against it on the parity weights in
tests/test_cams_reference.py); A is the NHWC target activation, G = dScore/dA:

- Grad-CAM++: alpha = G^2 / (2 G^2 + sum_hw(A) G^3 + eps) where G != 0;
  w_c = sum_hw(alpha * relu(G)); cam = relu(sum_c w_c A_c).
- HiResCAM: cam = relu(sum_c G_c * A_c) (element-wise, no spatial pooling of G).
- LayerCAM: cam = relu(sum_c relu(G_c) * A_c).
- XGrad-CAM: w_c = sum_hw(G_c * A_c) / (sum_hw(A_c) + 1e-7); cam = relu(sum_c w_c A_c).
- Score-CAM: each channel, upsampled to the input (align-corners bilinear) and min-max
  scaled, masks the input; w = softmax_c(target logit of the masked input);
  cam = relu(sum_c w_c A_c). The masked forward passes run on device in chunks of
  `chunk` channels (`lax.map`), so memory is bounded by `chunk * batch` images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from xmedjax import names
from xmedjax.explain.attribution import integrated_gradients_fn, smoothgrad_fn
from xmedjax.explain.capture import (
    choose_targets,
    eval_model,
    forward_with_activation,
    logits_and_targets,
)
from xmedjax.explain.gradcam import (
    CamResult,
    SaliencyMethod,
    grad_cam_fn,
    gradcam_raw,
    gradient_cam,
    gradient_cams,
)
from xmedjax.explain.maps import to_input_size
from xmedjax.models import model_spec

GRADCAMPP_EPS = 1e-6
XGRADCAM_EPS = 1e-7
SCORECAM_EPS = 1e-8


def gradcampp_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """Grad-CAM++ (Chattopadhyay et al. 2018) in pytorch-grad-cam's closed form."""
    g2 = gradient**2
    g3 = g2 * gradient
    sum_a = jnp.sum(activation, axis=(1, 2), keepdims=True)
    alpha = g2 / (2.0 * g2 + sum_a * g3 + GRADCAMPP_EPS)
    alpha = jnp.where(gradient != 0, alpha, 0.0)
    weights = jnp.sum(jax.nn.relu(gradient) * alpha, axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * activation, axis=-1))


def hirescam_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient x activation, summed over C."""
    return jax.nn.relu(jnp.sum(gradient * activation, axis=-1))


def layercam_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """LayerCAM (Jiang et al. 2021): relu(gradient) x activation, summed over C."""
    return jax.nn.relu(jnp.sum(jax.nn.relu(gradient) * activation, axis=-1))


def xgradcam_raw(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """XGrad-CAM (Fu et al. 2020): activation-normalised gradient x activation weights."""
    sum_a = jnp.sum(activation, axis=(1, 2), keepdims=True)
    weights = jnp.sum(gradient * activation / (sum_a + XGRADCAM_EPS), axis=(1, 2), keepdims=True)
    return jax.nn.relu(jnp.sum(weights * activation, axis=-1))


gradcampp_fn = gradient_cam(gradcampp_raw)
hirescam_fn = gradient_cam(hirescam_raw)
layercam_fn = gradient_cam(layercam_raw)
xgradcam_fn = gradient_cam(xgradcam_raw)

# The methods that need only the target activation and its gradient (one backward pass):
# name -> (its rule, its registry method). Keys: xmedjax.names.GRADIENT_CAMS.
_GRADIENT_CAMS = {
    "gradcam": (gradcam_raw, grad_cam_fn),
    "gradcampp": (gradcampp_raw, gradcampp_fn),
    "hirescam": (hirescam_raw, hirescam_fn),
    "layercam": (layercam_raw, layercam_fn),
    "xgradcam": (xgradcam_raw, xgradcam_fn),
}
GRADIENT_RULES: dict = {name: rule for name, (rule, _) in _GRADIENT_CAMS.items()}


def align_corners_matrix(out_size: int, in_size: int) -> jax.Array:
    """(out, in) interpolation matrix of torch's bilinear resize with align_corners=True."""
    if in_size == 1 or out_size == 1:
        return jnp.ones((out_size, in_size), jnp.float32) / in_size
    pos = jnp.arange(out_size, dtype=jnp.float32) * (in_size - 1) / (out_size - 1)
    lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, in_size - 2)
    frac = pos - lo
    eye = jnp.eye(in_size, dtype=jnp.float32)
    return eye[lo] * (1.0 - frac)[:, None] + eye[lo + 1] * frac[:, None]


def scorecam_masks(activation: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w, k) activations -> (B, H, W, k) masks: align-corners upsampled, min-max per channel."""
    rh = align_corners_matrix(size[0], activation.shape[1])
    rw = align_corners_matrix(size[1], activation.shape[2])
    up = jnp.einsum("Hh,bhwk,Ww->bHWk", rh, activation, rw, precision=jax.lax.Precision.HIGHEST)
    lo = jnp.min(up, axis=(1, 2), keepdims=True)
    hi = jnp.max(up, axis=(1, 2), keepdims=True)
    return (up - lo) / (hi - lo + SCORECAM_EPS)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("chunk", "layer"))
def scorecam_fn(
    graphdef, state, images, targets, *, chunk: int = 16, layer: str | None = None
) -> CamResult:
    """Score-CAM (Wang et al. 2020), masked forward passes chunked over channels on device."""
    logits, activation = forward_with_activation(graphdef, state, images, layer)
    chosen = choose_targets(logits, targets)
    batch, h, w, channels = activation.shape
    chunk = max(1, min(int(chunk), channels))
    n_chunks = -(-channels // chunk)
    padded = jnp.pad(activation, ((0, 0), (0, 0), (0, 0), (0, n_chunks * chunk - channels)))
    # (n_chunks, B, h, w, chunk): one slice of channels per lax.map step
    slices = jnp.moveaxis(padded.reshape(batch, h, w, n_chunks, chunk), 3, 0)
    model = eval_model(graphdef, state)
    size = images.shape[1:3]

    def scores(act_chunk: jax.Array) -> jax.Array:
        masks = scorecam_masks(act_chunk, size)  # (B, H, W, chunk)
        masked = images[:, None] * jnp.moveaxis(masks, -1, 1)[..., None]  # (B, chunk, H, W, Cin)
        out = model(masked.reshape(batch * chunk, *images.shape[1:])).astype(jnp.float32)
        out = out.reshape(batch, chunk, -1)
        return jnp.take_along_axis(out, chosen[:, None, None], axis=2)[..., 0]  # (B, chunk)

    score = jax.lax.map(scores, slices)  # (n_chunks, B, chunk)
    score = jnp.moveaxis(score, 0, 1).reshape(batch, n_chunks * chunk)[:, :channels]
    weights = jax.nn.softmax(score, axis=-1)
    raw = jax.nn.relu(
        jnp.einsum("bhwc,bc->bhw", activation, weights, precision=jax.lax.Precision.HIGHEST)
    )
    return CamResult(raw, to_input_size(raw, size), logits, chosen)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def uniform_maps(batch: int, height: int, width: int, seed: jax.Array) -> jax.Array:
    """(batch, height, width) seeded uniform maps in [0, 1); map b uses key fold_in(seed, b)."""
    keys = jax.vmap(lambda b: jax.random.fold_in(jax.random.PRNGKey(seed), b))(jnp.arange(batch))
    return jax.vmap(lambda k: jax.random.uniform(k, (height, width)))(keys)


def random_fn(graphdef, state, images, targets, *, seed: int = 0) -> CamResult:
    """The `random` baseline: seeded uniform maps at the input size, independent of the model.

    Built from two jitted pieces (the shared `capture.forward_fn` for the logits, and
    `uniform_maps`), so it adds no compile of the model of its own.
    """
    logits, chosen = logits_and_targets(graphdef, state, images, targets)
    raw = uniform_maps(images.shape[0], images.shape[1], images.shape[2], seed)
    return CamResult(raw, raw, logits, chosen)


def auto_cam_layer(
    graphdef: nnx.GraphDef, state: nnx.State, image_shape: tuple[int, ...], min_grid: int = 7
) -> str | None:
    """The CAM target layer for an input shape (H, W, C): None (the model's own) when its grid
    is at least `min_grid` on each side (ResNet50 at 224 px: 7x7), else the deepest of the
    model's earlier CAM layers (`ModelSpec.cam_layers`) that is (at 64 px: ResNet50
    `layer2`, DenseNet121 `features.denseblock2`, 8x8), else the shallowest of them.

    A 2x2 grid (either model at 64 px) cannot place a small lesion: its upsampled maps
    peak in a quadrant, and on the phantoms they localise no better than random maps.
    """
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

    def grid(layer):
        _, act = jax.eval_shape(
            lambda s, x: forward_with_activation(graphdef, s, x, layer), state, images
        )
        return min(act.shape[1:3])

    if grid(None) >= min_grid:
        return None
    # the model's earlier targets, deepest first; a model that declares none keeps its own
    spec = model_spec(graphdef, state, default=None)
    candidates = spec.cam_layers if spec is not None else ()
    for layer in candidates:
        if grid(layer) >= min_grid:
            return layer
    return candidates[-1] if candidates else None


def cam_layer_caveat(methods, layer: str | None) -> str | None:
    """A warning when channel-weighted CAMs (`names.CHANNEL_WEIGHTED_CAMS`) map an earlier
    layer than the model's own target (`layer` not None), else None.

    At the model's own target (global average pooling, then a linear head) the gradient is
    the same at every position, so Grad-CAM's spatial average of it loses nothing (Grad-CAM
    = HiResCAM = CAM there). At an earlier layer the gradient changes sign from position to
    position and is largest where the evidence is; its average keeps a few per cent of it
    and is set by the positions without the lesion. Measured on the phantom models at
    layer2 over 5 seeds (benchmarks/NOTES.md, "Phantom localisation"): |mean_hw G| /
    mean_hw |G| = 0.11-0.15; pointing game Grad-CAM 0.06-0.25, Score-CAM on the same
    channels 0.47-0.78, HiResCAM 0.09-0.53; HiResCAM minus Grad-CAM alone scores as
    HiResCAM does.
    """
    weighted = [m for m in methods if m in names.CHANNEL_WEIGHTED_CAMS]
    if layer is None or not weighted:
        return None
    return (
        f"{', '.join(weighted)} at {layer}, an earlier layer than the model's own target: "
        "one spatially averaged gradient weight per channel discards where the evidence is "
        "and localises unreliably there; prefer hirescam, layercam or scorecam "
        "(per-position weights) at this layer"
    )


@functools.partial(jax.jit, static_argnums=0, static_argnames=("names", "layer"))
def gradient_cams_fn(
    graphdef, state, images, targets, *, names: tuple[str, ...], layer: str | None = None
) -> dict[str, CamResult]:
    """Several gradient CAMs (names from GRADIENT_RULES) from ONE forward/backward pass."""
    rules = {name: GRADIENT_RULES[name] for name in names}
    return gradient_cams(rules, graphdef, state, images, targets, layer)


def compute_methods(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    targets: jax.Array | None,
    names: tuple[str, ...],
    method_opts: dict[str, dict] | None = None,
    layer: str | None = None,
) -> dict[str, CamResult]:
    """Runs the named registry methods on one batch, sharing the backward pass of the gradient CAMs.

    Same results as calling each `METHODS[name]`; the gradient CAMs (GRADIENT_RULES) run as
    one jitted function so they cost one compile and one backward pass together. `layer`
    (a CAM target layer, see `xmedjax.explain.capture`) applies to the CAM_METHODS only.
    """
    method_opts = {k: dict(v) for k, v in (method_opts or {}).items()}
    if layer is not None:
        for name in CAM_METHODS:
            method_opts.setdefault(name, {})["layer"] = layer
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown saliency methods {unknown}; choose from {sorted(METHODS)}")
    # all five at once whenever one is asked for: one compile serves every call
    grouped = tuple(GRADIENT_RULES) if any(n in GRADIENT_RULES for n in names) else ()
    out = (
        dict(gradient_cams_fn(graphdef, state, images, targets, names=grouped, layer=layer))
        if grouped
        else {}
    )
    for name in names:
        if name not in out:
            out[name] = METHODS[name](graphdef, state, images, targets, **method_opts.get(name, {}))
    return {name: out[name] for name in names}


# Every saliency method under one signature (`gradcam.SaliencyMethod`).
# Keys: xmedjax.names.SALIENCY_METHODS, in that order (tests/test_cams.py checks they agree).
METHODS: dict[str, SaliencyMethod] = {
    **{name: method for name, (_, method) in _GRADIENT_CAMS.items()},
    "scorecam": scorecam_fn,
    "integrated_gradients": integrated_gradients_fn,
    "smoothgrad": smoothgrad_fn,
    "random": random_fn,
}
CAM_METHODS = names.CAM_METHODS


__all__ = [
    "CAM_METHODS",
    "auto_cam_layer",
    "cam_layer_caveat",
    "GRADIENT_RULES",
    "METHODS",
    "compute_methods",
    "gradient_cams_fn",
    "random_fn",
    "align_corners_matrix",
    "gradcampp_fn",
    "gradcampp_raw",
    "hirescam_fn",
    "hirescam_raw",
    "layercam_fn",
    "layercam_raw",
    "scorecam_fn",
    "scorecam_masks",
    "uniform_maps",
    "xgradcam_fn",
    "xgradcam_raw",
]
