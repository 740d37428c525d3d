"""The CAM formulas: pure, batched functions of activations `A` and gradients `G`.

Each takes `A, G` of shape `[B, C, h, w]` (gradients of the per-image class score w.r.t. `A`)
and returns a non-negative float32 map `[B, h, w]` at layer resolution, ReLU'd but not
normalised, so magnitudes stay comparable across evaluations. No division can produce NaN:
where a denominator is zero, the corresponding weight is zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schema import INPUT_LAYER

CamFormula = Callable[[Tensor, Tensor], Tensor]


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """relu(sum_c w[b, c] * A[b, c]) for channel weights `[B, C]`."""
    return torch.relu(torch.einsum("bc,bchw->bhw", weights, activations))


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 wherever the denominator is 0."""
    nonzero = denominator != 0
    return torch.where(nonzero, numerator / torch.where(nonzero, denominator, 1.0), 0.0)


def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient.

    Example:
        >>> A = torch.ones(1, 2, 3, 3); G = torch.stack([torch.ones(3, 3), -torch.ones(3, 3)])[None]
        >>> gradcam(A, 2 * G).sum().item()  # weights +2 and -2 cancel
        0.0
    """
    return _weighted_sum(gradients.mean(dim=(2, 3)), activations)


def gradcam_plus_plus(
    activations: Tensor,
    gradients: Tensor,
    second: Tensor | None = None,
    third: Tensor | None = None,
) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018), closed form under an exponential score.

    alpha = G^2 / (2 G^2 + sum_ab(A) G^3); weights = sum_ab(alpha * relu(G)). Smooth
    Grad-CAM++ (Omeiza et al. 2019) passes the means of G^2 and G^3 over noisy copies.
    """
    spatial_sum = activations.sum(dim=(2, 3), keepdim=True)
    if second is None and third is None:
        # With G^2 and G^3 of one pass, alpha * relu(G) = relu(G) / (2 + sum_ab(A) G): the same
        # value in a third of the passes, and no G^3 to underflow.
        weighted = _safe_divide(torch.relu(gradients), 2 + spatial_sum * gradients)
    else:
        g2 = gradients.pow(2) if second is None else second
        g3 = g2 * gradients if third is None else third
        weighted = _safe_divide(g2, 2 * g2 + spatial_sum * g3) * torch.relu(gradients)
    return _weighted_sum(weighted.sum(dim=(2, 3)), activations)


def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): gradients averaged with the activations as weights."""
    spatial_sum = activations.sum(dim=(2, 3))
    weights = _safe_divide((gradients * activations).sum(dim=(2, 3)), spatial_sum)
    return _weighted_sum(weights, activations)


def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): each location weighted by its own positive gradient."""
    return torch.relu((torch.relu(gradients) * activations).sum(dim=1))


def hirescam(activations: Tensor, gradients: Tensor) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient times activation, summed."""
    return torch.relu((gradients * activations).sum(dim=1))


def class_activation_map(activations: Tensor, class_weights: Tensor) -> Tensor:
    """CAM (Zhou et al. 2016): channels weighted by the linear head's row `[B, C]` of each target.

    Example:
        >>> A = torch.stack([torch.ones(2, 2), torch.eye(2)])[None]  # [1, 2, 2, 2]
        >>> class_activation_map(A, torch.tensor([[1.0, -2.0]])).tolist()
        [[[0.0, 1.0], [1.0, 0.0]]]
    """
    return _weighted_sum(class_weights.float(), activations.float())


GRADIENT_METHODS: dict[str, CamFormula] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
}

#: Key standing in for a layer name for maps at input resolution: `result["input", "saliency"]`.
INPUT_KEY = INPUT_LAYER

#: Methods that divide by per-channel activation sums: ill-posed on signed activations.
SIGN_SENSITIVE_METHODS: frozenset[str] = frozenset(["gradcam++", "xgradcam"])
#: Maps at layer resolution `[B, h, w]`, non-negative, keyed `(layer, method)`.
CAM_METHODS: frozenset[str] = frozenset([*GRADIENT_METHODS, "cam"])
#: Maps at input resolution `[B, H, W]`, keyed `("input", method)` except `guided_gradcam`,
#: which is computed for every layer and keyed `(layer, "guided_gradcam")`.
_PIXEL_ORDER = (
    "saliency",
    "smoothgrad",
    "integrated_gradients",
    "guided_backprop",
    "guided_gradcam",
    "deconvnet",
)
PIXEL_METHODS: frozenset[str] = frozenset(_PIXEL_ORDER)
#: Pixel methods keyed by `"input"` rather than by a layer.
INPUT_METHODS: frozenset[str] = PIXEL_METHODS - {"guided_gradcam"}
#: Methods whose maps keep their sign (channel sums of signed attributions); draw them with a
#: diverging colormap. Every other map is non-negative.
SIGNED_METHODS: frozenset[str] = frozenset(
    ["integrated_gradients", "guided_backprop", "guided_gradcam", "deconvnet"]
)
#: Every method name, in the order error messages list them.
ALL_METHODS: tuple[str, ...] = (*GRADIENT_METHODS, "cam", *_PIXEL_ORDER)


def apply_method(
    name: str,
    activations: Tensor,
    gradients: Tensor,
    moments: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Run one gradient formula in float32 (activations from autocast may be half precision).

    `moments` are the means of G^2 and G^3 over noisy copies (Smooth Grad-CAM++); when given,
    `gradients` is the mean of G. Only `gradcam++` uses them, the other formulas are linear
    in G or use only its mean.
    """
    # A caller's autocast would otherwise recast the einsum to half precision.
    with torch.autocast(device_type=activations.device.type, enabled=False):
        if name == "gradcam++" and moments is not None:
            second, third = moments
            return gradcam_plus_plus(
                activations.float(), gradients.float(), second.float(), third.float()
            )
        return GRADIENT_METHODS[name](activations.float(), gradients.float())


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `[B, h, w]` maps to `size`, clamped back to non-negative.

    Example:
        >>> upsample_maps(torch.ones(2, 3, 3), (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    resized = torch.nn.functional.interpolate(
        maps[:, None].float(), size=size, mode="bilinear", align_corners=False
    )
    return resized[:, 0].clamp_min(0)


def normalize_maps(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Min-max normalise each map of `[B, h, w]` to [0, 1]; a constant map becomes all zeros.

    Example:
        >>> normalize_maps(torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]])).tolist()
        [[[0.0, 1.0]], [[0.0, 0.0]]]
    """
    flat = maps.flatten(1).float()
    low = flat.amin(dim=1, keepdim=True)
    span = (flat.amax(dim=1, keepdim=True) - low).clamp_min(eps)
    return ((flat - low) / span).view_as(maps)
