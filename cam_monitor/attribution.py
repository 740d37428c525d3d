"""Pixel-level attributions: saliency, SmoothGrad, IG, guided backprop, deconvnet.

Each function takes the probe as a `Batch` and feeds the model rows built from it with
`Batch.with_image` (noisy copies, interpolation steps), in passes of at most `rows_per_pass`
rows. A `score_fn(rows, image_index)` runs the model on such rows and returns the class score
each row explains (the class chosen for probe image `image_index[r]`), so the class stays fixed
across copies and steps. Gradients come from `torch.autograd.grad` w.r.t. the input only:
parameter `.grad` is never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .batch import Batch
from .capture import Hook, scoped_hooks
from .notices import warn

#: `score_fn(rows, image_index) -> scores [R]`: the model's class score for each row.
ScoreFn = Callable[[Batch, Tensor], Tensor]

#: Noisy copies SmoothGrad averages over when `smooth=0` leaves the count open.
SMOOTHGRAD_SAMPLES = 16

_RELU_FUNCTIONS = frozenset([F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_])
_INPLACE_RELUS = frozenset([F.relu_, torch.relu_, Tensor.relu_])
#: Rectifier-like activations without a guided or deconvnet rule: they pass plain gradients
#: (`nn.ReLU6` calls `hardtanh`; captum's GuidedBackprop leaves them alone too).
_UNRULED_ACTIVATIONS = frozenset(
    [
        F.gelu, F.silu, F.hardswish, F.mish, F.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu,
        F.leaky_relu_, F.elu, F.elu_, F.selu, F.selu_, F.celu, F.celu_, F.prelu, torch.prelu,
        F.rrelu, F.rrelu_, F.softplus, F.threshold, F.threshold_,
    ]
)  # fmt: skip

#: How a ReLU passes gradients back: guided backprop, or the deconvnet.
ReluRule = Literal["guided", "deconvnet"]
RELU_RULES: tuple[str, ...] = ("guided", "deconvnet")


def pass_ranges(rows: int, rows_per_pass: int | None) -> list[tuple[int, int]]:
    """Split `rows` into consecutive `(start, stop)` passes of at most `rows_per_pass` rows.

    Example:
        >>> pass_ranges(5, 2), pass_ranges(5, None)
        ([(0, 2), (2, 4), (4, 5)], [(0, 5)])
    """
    step = rows_per_pass or rows
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def add_rows(total: Tensor, index: Tensor, values: Tensor) -> None:
    """`total[index[r]] += values[r]` for every row, in place, on a contiguous `total`.

    Runs on 2-D views: `index_add_` on flat rows is fast on every backend.

    Example:
        >>> total = torch.zeros(2, 1, 2)
        >>> add_rows(total, torch.tensor([1, 1, 0]), torch.ones(3, 1, 2))
        >>> total[:, 0].tolist()
        [[1.0, 1.0], [2.0, 2.0]]
    """
    total.view(total.shape[0], -1).index_add_(0, index, values.reshape(values.shape[0], -1))


def saliency_map(gradients: Tensor) -> Tensor:
    """Simonyan et al. 2014: max over channels of |gradient|, `[B, C, H, W]` -> `[B, H, W]`."""
    return gradients.detach().float().abs().amax(dim=1)


def channel_sum(attributions: Tensor) -> Tensor:
    """Signed attributions `[B, C, H, W]` summed over channels (sums and completeness kept)."""
    return attributions.detach().float().sum(dim=1)


def noise_scale(image: Tensor, noise: float) -> Tensor:
    """Per-image noise std `[B]`: `noise` times the image's value range (max - min).

    Example:
        >>> noise_scale(torch.stack([torch.zeros(1, 2, 2), torch.eye(2)[None] * 4]), 0.25)
        tensor([0., 1.])
    """
    flat = image.detach().flatten(1).float()
    return noise * (flat.amax(dim=1) - flat.amin(dim=1))


def noisy_rows(image: Tensor, index: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
    """Copies `image[index]` plus Gaussian noise of std `sigma[index]`, drawn from `generator`."""
    draw = torch.randn(
        (index.shape[0], *image.shape[1:]),
        generator=generator,
        device=image.device,
        dtype=torch.float32,
    )
    scale = sigma[index].view(-1, *([1] * (image.dim() - 1)))
    return (image.detach()[index].float() + draw * scale).to(image.dtype)


def check_finite_baseline(baseline: float | Tensor | None) -> None:
    """Refuse a NaN or infinite integrated-gradients baseline: every integration step would be
    NaN. Once per call (a tensor's check reads one value back from its device)."""
    if baseline is None or isinstance(baseline, bool):
        return
    if isinstance(baseline, Tensor):
        finite = bool(torch.isfinite(baseline).all())
    else:
        finite = not isinstance(baseline, (int, float)) or math.isfinite(baseline)
    if not finite:
        raise ValueError(
            "ig_baseline holds NaN or infinity; pass finite values (a number, or a tensor "
            "[C, 1, 1], [1, C, H, W] or [B, C, H, W])."
        )


def resolve_baseline(baseline: float | Tensor | None, image: Tensor) -> Tensor:
    """The integrated-gradients baseline as a tensor of the image's shape (default: zeros).

    A tensor baseline broadcasts against the image (`[C, 1, 1]`, `[1, C, H, W]`, `[B, C, H, W]`).

    Example:
        >>> grey = torch.tensor([0.5, 0.0, 1.0])[:, None, None]
        >>> resolve_baseline(grey, torch.ones(2, 3, 4, 4))[1, :, 0, 0]
        tensor([0.5000, 0.0000, 1.0000])
    """
    if baseline is None:
        return torch.zeros_like(image.detach())
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise TypeError(
            f"ig_baseline must be None, a number or a tensor, got {type(baseline).__name__}."
        )
    value = torch.as_tensor(baseline, dtype=image.dtype, device=image.device)
    try:
        return value.detach().expand_as(image).clone()
    except RuntimeError as err:
        raise ValueError(
            f"ig_baseline of shape {tuple(value.shape)} does not broadcast to the images "
            f"{tuple(image.shape)}; pass a number, [C, 1, 1], [1, C, H, W] or [B, C, H, W]."
        ) from err


def integrated_gradients(
    score_fn: ScoreFn,
    batch: Batch,
    baseline: Tensor,
    steps: int,
    rows_per_pass: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Integrated gradients (Sundararajan et al. 2017), midpoint Riemann sum of `steps` steps.

    Returns `(attributions [B, C, H, W], baseline scores [B])`: attributions are
    `(x - baseline) * mean_k grad F(baseline + (k + 1/2)/steps * (x - baseline))`. Every
    image's steps and one baseline row are stacked along the batch and run in passes.
    """
    image = batch.require_image()
    count, per_image = image.shape[0], steps + 1
    alphas = torch.cat([(torch.arange(steps, dtype=torch.float32) + 0.5) / steps, torch.zeros(1)])
    weights = torch.cat([torch.full((steps,), 1.0 / steps), torch.zeros(1)])
    alphas, weights = alphas.to(image.device), weights.to(image.device)
    x, base = image.detach().float(), baseline.detach().float()
    total_grad = torch.zeros(x.shape, device=x.device)
    base_scores = torch.zeros(count, device=image.device)
    for start, stop in pass_ranges(count * per_image, rows_per_pass):
        rows = torch.arange(start, stop, device=image.device)
        index, step = rows // per_image, rows % per_image
        alpha = alphas[step].view(-1, 1, 1, 1)
        scaled = (base[index] + alpha * (x[index] - base[index])).to(image.dtype)
        scaled.requires_grad_(True)
        scores = score_fn(batch.with_image(scaled, index), index)
        (grad,) = torch.autograd.grad(scores.sum(), scaled)
        add_rows(total_grad, index, grad.float() * weights[step].view(-1, 1, 1, 1))
        at_base = step == steps
        base_scores[index[at_base]] = scores.detach().float()[at_base]
    return (x - base) * total_grad, base_scores


def completeness_warning(gap: Tensor, delta: Tensor, steps: int) -> str | None:
    """The warning when some image's |completeness gap| exceeds 10% of its score difference.

    Example:
        >>> completeness_warning(torch.tensor([0.01, 0.5]), torch.tensor([1.0, 2.0]), 32)[:40]
        'integrated_gradients: for 1 of 2 images '
    """
    relative = gap.abs().float() / delta.abs().float().clamp_min(1e-12)
    relative = torch.where(delta.abs() > 1e-6, relative, torch.zeros_like(relative))
    over = relative > 0.1
    if not bool(over.any()):
        return None
    return (
        f"integrated_gradients: for {int(over.sum())} of {gap.numel()} images the attributions "
        f"miss the score difference to the baseline by more than 10% (worst "
        f"{float(relative.max()):.0%}): ig_steps={steps} steps are too few for this model's "
        f"curvature. Pass more, e.g. ig_steps={4 * steps}; CamResult.extras holds the gaps."
    )


class _RuledRelu(torch.autograd.Function):
    """`max(x, 0)` forward (in place when the ReLU was); the backward follows a `ReluRule`."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rule: ReluRule, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_min_(0)
        else:
            out = x.clamp_min(0)
        ctx.rule = rule
        if rule == "guided":
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        passed = grad.clamp_min(0)  # both rules pass positive gradients only
        if ctx.rule == "guided":  # ... and only where the forward input was positive
            (out,) = ctx.saved_tensors
            passed = torch.where(out > 0, passed, torch.zeros_like(passed))
        return passed, None, None


class _FunctionalRelus(TorchFunctionMode):
    """Applies the rule to `F.relu` / `torch.relu` / `Tensor.relu` calls on tensors with grad."""

    def __init__(self, rule: ReluRule) -> None:
        super().__init__()
        self.rule = rule
        self.applied = 0
        self.unruled: dict[str, int] = {}  # other activations on tensors with grad, by name

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RELU_FUNCTIONS and args and isinstance(args[0], Tensor):
            x = args[0]
            if x.requires_grad and torch.is_grad_enabled():
                flag = kwargs.get("inplace", args[1] if len(args) > 1 else False)
                self.applied += 1
                return _RuledRelu.apply(x, self.rule, func in _INPLACE_RELUS or bool(flag))
        elif func in _UNRULED_ACTIVATIONS and args and isinstance(args[0], Tensor):
            if args[0].requires_grad and torch.is_grad_enabled():
                name = func.__name__.rstrip("_")
                self.unruled[name] = self.unruled.get(name, 0) + 1
        return func(*args, **kwargs)


@contextmanager
def ruled_relus(model: nn.Module, rule: ReluRule) -> Iterator[None]:
    """Every ReLU of the forward run inside the block passes gradients by `rule`.

    `"guided"` (guided backprop) passes a gradient where it and the forward input are
    positive; `"deconvnet"` where the gradient is positive, whatever the input. `nn.ReLU`
    modules (in place or not, also one module called several times) and functional ReLUs
    (`F.relu`, `torch.relu`, `Tensor.relu` and their in-place forms) get the same rule; forward
    values are unchanged. Hooks and the function mode are removed on every exit path, and
    modules keep their `inplace` flags. A forward with no ReLU to rule gets a warning.

    Example:
        >>> x = torch.tensor([-1.0, 2.0], requires_grad=True)
        >>> with ruled_relus(nn.Identity(), "deconvnet"):
        ...     (grad,) = torch.autograd.grad((F.relu(x) * torch.tensor([3.0, -1.0])).sum(), x)
        >>> grad.tolist()  # plain backprop: [0.0, -1.0]; guided: [0.0, 0.0]
        [3.0, 0.0]
    """
    if rule not in RELU_RULES:
        raise ValueError(f"rule must be one of {', '.join(RELU_RULES)}, got {rule!r}.")
    # The module runs on a detached alias of its input (its own graph is dropped); the hook
    # after it returns the ruled ReLU of the input itself, in place if the module was.
    inputs: dict[nn.Module, list[Tensor]] = {}

    def before(module: nn.Module, args: tuple) -> tuple | None:
        if not (args and isinstance(args[0], Tensor)):
            return None
        if not (args[0].requires_grad and torch.is_grad_enabled()):
            return None
        inputs.setdefault(module, []).append(args[0])
        return (args[0].detach(), *args[1:])

    def after(module: nn.Module, args: tuple, output: Any) -> Tensor | None:
        pending = inputs.get(module)
        if not pending:
            return None
        functional.applied += 1
        return _RuledRelu.apply(pending.pop(), rule, bool(getattr(module, "inplace", False)))

    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    hooks: list[Hook] = [(relu, "forward_pre", before) for relu in relus]
    hooks += [(relu, "forward", after) for relu in relus]
    functional = _FunctionalRelus(rule)
    with scoped_hooks(hooks), functional:
        yield
    name = "guided backprop" if rule == "guided" else "deconvnet"
    kinds = ", ".join(f"{kind} x{n}" for kind, n in functional.unruled.items())
    if not functional.applied:
        ran = f" (it ran {kinds})" if kinds else ""
        warn(
            f"{type(model).__name__} ran no ReLU on a tensor that needs a gradient{ran}, so "
            f"{name} equals the plain input gradient here (GELU, SiLU and other activations "
            f"have no {name} rule). Use saliency or integrated_gradients for such models.",
            stacklevel=3,
        )
    elif functional.unruled:
        count = sum(functional.unruled.values())
        warn(
            f"{type(model).__name__} ran {_plural(functional.applied, 'ReLU')} under the {name} "
            f"rule and {_plural(count, 'other activation')} ({kinds}) that have no such rule "
            f"and pass the plain gradient: the map is {name} at the ReLUs only. Use saliency or "
            "integrated_gradients for a map that treats every activation alike.",
            stacklevel=3,
        )


def _plural(count: int, noun: str) -> str:
    """`"1 ReLU"`, `"3 ReLUs"`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def relu_rule_gradients(
    model: nn.Module,
    score_fn: ScoreFn,
    batch: Batch,
    rule: ReluRule,
    rows_per_pass: int | None = None,
) -> Tensor:
    """Input gradients `[B, C, H, W]` of the scores with every ReLU ruled by `rule`.

    `model` is the module whose `nn.ReLU`s are ruled (functional ReLUs in `score_fn` are too);
    `score_fn` runs it.
    """
    image = batch.require_image()
    result = torch.zeros_like(image.detach(), dtype=torch.float32)
    with ruled_relus(model, rule):
        for start, stop in pass_ranges(image.shape[0], rows_per_pass):
            index = torch.arange(start, stop, device=image.device)
            rows = image.detach()[index].requires_grad_(True)
            scores = score_fn(batch.with_image(rows, index), index)
            (grad,) = torch.autograd.grad(scores.sum(), rows)
            result[index] = grad.float()
    return result


def guided_backprop(
    model: nn.Module,
    score_fn: ScoreFn,
    batch: Batch,
    rows_per_pass: int | None = None,
) -> Tensor:
    """Guided backprop (Springenberg et al. 2015): input gradients `[B, C, H, W]` with guided ReLUs.

    `model` is the module whose `nn.ReLU`s are guided; `score_fn` runs it (`ruled_relus`).
    """
    return relu_rule_gradients(model, score_fn, batch, "guided", rows_per_pass)


def deconvnet(
    model: nn.Module,
    score_fn: ScoreFn,
    batch: Batch,
    rows_per_pass: int | None = None,
) -> Tensor:
    """Deconvnet (Zeiler & Fergus 2014): input gradients `[B, C, H, W]`, each ReLU passing back
    the positive part of its gradient whatever its forward input."""
    return relu_rule_gradients(model, score_fn, batch, "deconvnet", rows_per_pass)
