"""The CAM formulas: pure, batched functions of activations `A` and gradients `G`.

Each takes `A, G` of shape `[B, C, h, w]` (gradients of the per-image class score w.r.t. `A`)
and returns a non-negative float32 map `[B, h, w]` at layer resolution, ReLU'd but not
normalised, so magnitudes stay comparable across evaluations. No division can produce NaN:
where a denominator is zero, the corresponding weight is zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

CamFormula = Callable[[Tensor, Tensor], Tensor]


def _weighted_sum(weights: Tensor, activations: Tensor) -> Tensor:
    """relu(sum_c w[b, c] * A[b, c]) for channel weights `[B, C]`: `_weighted_sums` of one, the
    same matrix product, with fewer view ops."""
    batch, _, height, width = activations.shape
    product = torch.bmm(weights.unsqueeze(1), activations.flatten(2))  # [B, 1, h * w]
    return product.relu_().view(batch, height, width)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 wherever the denominator is 0."""
    # Where the denominator is 0 the quotient is inf or NaN, and `where` drops it.
    return torch.where(denominator != 0, numerator / denominator, 0.0)


def gradcam_weights(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM's channel weights `[B, C]`: the spatially averaged gradient."""
    return gradients.mean(dim=(2, 3))


def gradcam_plus_plus_weights(
    activations: Tensor,
    gradients: Tensor,
    second: Tensor | None = None,
    third: Tensor | None = None,
    spatial_sum: Tensor | None = None,
) -> Tensor:
    """Grad-CAM++'s channel weights `[B, C]` (closed form under an exponential score).

    alpha = G^2 / (2 G^2 + sum_ab(A) G^3); weights = sum_ab(alpha * relu(G)). Smooth
    Grad-CAM++ passes the means of G^2 and G^3 over noisy copies; `spatial_sum`, sum_ab(A)
    `[B, C]`, when the caller has it already.
    """
    if spatial_sum is None:
        spatial_sum = activations.sum(dim=(2, 3))
    total = spatial_sum[:, :, None, None]
    if second is None and third is None:
        # With G^2 and G^3 of one pass, alpha * relu(G) = relu(G) / (2 + sum_ab(A) G): the same
        # value in a third of the passes, and no G^3 to underflow.
        weighted = _safe_divide(torch.relu(gradients), 2 + total * gradients)
    else:
        g2 = gradients.pow(2) if second is None else second
        g3 = g2 * gradients if third is None else third
        weighted = _safe_divide(g2, 2 * g2 + total * g3) * torch.relu(gradients)
    return weighted.sum(dim=(2, 3))


def xgradcam_weights(
    activations: Tensor,
    gradients: Tensor,
    spatial_sum: Tensor | None = None,
    product: Tensor | None = None,
) -> Tensor:
    """XGrad-CAM's channel weights `[B, C]`: gradients averaged with the activations as weights
    (`spatial_sum` = sum_ab(A) `[B, C]` and `product` = G * A when the caller has them)."""
    if spatial_sum is None:
        spatial_sum = activations.sum(dim=(2, 3))
    if product is None:
        product = gradients * activations
    return _safe_divide(product.sum(dim=(2, 3)), spatial_sum)


def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): channels weighted by their spatially averaged gradient.

    Example:
        >>> A = torch.ones(1, 2, 3, 3); G = torch.stack([torch.ones(3, 3), -torch.ones(3, 3)])[None]
        >>> gradcam(A, 2 * G).sum().item()  # weights +2 and -2 cancel
        0.0
    """
    return _weighted_sum(gradcam_weights(activations, gradients), activations)


def gradcam_plus_plus(
    activations: Tensor,
    gradients: Tensor,
    second: Tensor | None = None,
    third: Tensor | None = None,
) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018); Smooth Grad-CAM++ (Omeiza et al. 2019) with the
    means of G^2 and G^3 over noisy copies as `second` and `third`."""
    weights = gradcam_plus_plus_weights(activations, gradients, second, third)
    return _weighted_sum(weights, activations)


def xgradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): gradients averaged with the activations as weights."""
    return _weighted_sum(xgradcam_weights(activations, gradients), activations)


def layercam(activations: Tensor, gradients: Tensor) -> Tensor:
    """LayerCAM (Jiang et al. 2021): each location weighted by its own positive gradient."""
    return torch.relu((torch.relu(gradients) * activations).sum(dim=1))


def hirescam(activations: Tensor, gradients: Tensor, product: Tensor | None = None) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): element-wise gradient times activation, summed
    (`product` = G * A when the caller has it)."""
    if product is None:
        product = gradients * activations
    return torch.relu(product.sum(dim=1))


def class_activation_map(activations: Tensor, class_weights: Tensor) -> Tensor:
    """CAM (Zhou et al. 2016): channels weighted by the linear head's row `[B, C]` of each target.

    Example:
        >>> A = torch.stack([torch.ones(2, 2), torch.eye(2)])[None]  # [1, 2, 2, 2]
        >>> class_activation_map(A, torch.tensor([[1.0, -2.0]])).tolist()
        [[[0.0, 1.0], [1.0, 0.0]]]
    """
    # A caller's autocast would otherwise run the weighted sum in half precision.
    with torch.autocast(device_type=activations.device.type, enabled=False):
        return _weighted_sum(class_weights.float(), activations.float())


GRADIENT_METHODS: dict[str, CamFormula] = {
    "gradcam": gradcam,
    "gradcam++": gradcam_plus_plus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "hirescam": hirescam,
}

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
    return gradient_maps((name,), activations, gradients, moments)[name]


def gradient_maps(
    methods: Sequence[str],
    activations: Tensor,
    gradients: Tensor,
    moments: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Every gradient CAM in `methods` for one layer, in float32, as `apply_method` gives each.

    The methods share sum_ab(A) and G * A, and the channel-weight
    methods (gradcam, gradcam++, xgradcam) share one batched weighted sum: on a GPU, where a
    CAM call is bound by kernel launches, the number of ops is what costs.

    Example:
        >>> A, G = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        >>> maps = gradient_maps(["gradcam", "hirescam"], A, G)
        >>> torch.allclose(maps["gradcam"], gradcam(A, G), atol=1e-6), maps["hirescam"].shape
        (True, torch.Size([2, 4, 4]))
    """
    unknown = [m for m in methods if m not in GRADIENT_METHODS]
    if unknown:
        raise ValueError(f"Not gradient methods: {unknown}; known: {list(GRADIENT_METHODS)}.")
    device = activations.device.type
    if not torch.is_autocast_enabled(device):  # entering autocast(enabled=False) is not free
        return _gradient_maps(methods, activations, gradients, moments)
    # A caller's autocast would otherwise recast the products to half precision.
    with torch.autocast(device_type=device, enabled=False):
        return _gradient_maps(methods, activations, gradients, moments)


def _gradient_maps(
    methods: Sequence[str],
    activations: Tensor,
    gradients: Tensor,
    moments: tuple[Tensor, Tensor] | None,
) -> dict[str, Tensor]:
    """`gradient_maps` with autocast off."""
    a, g = as_float32(activations), as_float32(gradients)
    if len(methods) == 1 and methods[0] == "gradcam":  # the usual call, without the set logic
        return {"gradcam": _weighted_sum(gradcam_weights(a, g), a)}
    wanted = set(methods)
    spatial_sum = a.sum(dim=(2, 3)) if wanted & {"gradcam++", "xgradcam"} else None
    product = g * a if wanted & {"xgradcam", "hirescam"} else None
    weights: dict[str, Tensor] = {}
    if "gradcam" in wanted:
        weights["gradcam"] = gradcam_weights(a, g)
    if "gradcam++" in wanted:
        second, third = (None, None) if moments is None else map(as_float32, moments)
        weights["gradcam++"] = gradcam_plus_plus_weights(a, g, second, third, spatial_sum)
    if "xgradcam" in wanted:
        weights["xgradcam"] = xgradcam_weights(a, g, spatial_sum, product)
    maps = dict(zip(weights, _weighted_sums(list(weights.values()), a), strict=True))
    if "layercam" in wanted:
        maps["layercam"] = layercam(a, g)
    if "hirescam" in wanted:
        maps["hirescam"] = hirescam(a, g, product)
    return {method: maps[method] for method in methods}


def as_float32(tensor: Tensor) -> Tensor:
    """`tensor` in float32, without a dispatched no-op where it is float32 already."""
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _weighted_sums(weights: list[Tensor], activations: Tensor) -> list[Tensor]:
    """`_weighted_sum` of each of several `[B, C]` weights in one batched matrix product; each
    result is a contiguous `[B, h, w]`."""
    if not weights:
        return []
    if len(weights) == 1:
        return [_weighted_sum(weights[0], activations)]
    batch, _, height, width = activations.shape
    stacked = torch.stack(weights, dim=1) if len(weights) > 1 else weights[0][:, None]
    sums = torch.relu(torch.bmm(stacked, activations.flatten(2)))  # [B, M, h * w]
    if len(weights) > 1:
        sums = sums.transpose(0, 1).contiguous()
    return list(sums.view(len(weights), batch, height, width))


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of `[B, h, w]` maps to `size`: a convex mix of neighbours, so a
    non-negative map stays non-negative and a signed one (integrated gradients) keeps its sign.

    Example:
        >>> upsample_maps(torch.ones(2, 3, 3), (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    resized = torch.nn.functional.interpolate(
        maps[:, None].float(), size=size, mode="bilinear", align_corners=False
    )
    return resized[:, 0]


def normalize_maps(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Min-max normalise each map of `[B, h, w]` to [0, 1]; a constant map becomes all zeros.

    A map whose range is within `eps`, or within float32 rounding of its magnitude (a 1x1
    map upsampled), counts as constant: its rounding noise is no structure to draw.

    Example:
        >>> normalize_maps(torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]])).tolist()
        [[[0.0, 1.0]], [[0.0, 0.0]]]
    """
    flat = maps.flatten(1).float()
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    span = high - low
    flat_enough = span <= torch.maximum(high.abs(), low.abs()) * _ROUNDING
    span = torch.where(flat_enough, math.inf, span.clamp_min(eps))
    return ((flat - low) / span).view_as(maps)


#: Range, relative to a map's magnitude, within which it is flat: about 100 float32 ulps.
_ROUNDING = 1e-5
