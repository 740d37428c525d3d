"""Pixel-level attributions: saliency, SmoothGrad, integrated gradients, guided backprop.

Each function takes the probe as a `Batch` and feeds the model rows built from it with
`Batch.with_image` (noisy copies, interpolation steps), in passes of at most `rows_per_pass`
rows. A `score_fn(rows, image_index)` runs the model on such rows and returns the class score
each row explains (the class chosen for probe image `image_index[r]`), so the class stays fixed
across copies and steps. Gradients come from `torch.autograd.grad` w.r.t. the input only:
parameter `.grad` is never touched.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .batch import Batch
from .capture import Hook, scoped_hooks

#: `score_fn(rows, image_index) -> scores [R]`: the model's class score for each row.
ScoreFn = Callable[[Batch, Tensor], Tensor]

#: Noisy copies SmoothGrad averages over when `smooth=0` leaves the count open.
SMOOTHGRAD_SAMPLES = 16

_RELU_FUNCTIONS = frozenset([F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_])


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


class _FunctionalReluSpy(TorchFunctionMode):
    """Counts `F.relu` / `torch.relu` / `Tensor.relu` calls made outside `nn.ReLU` modules."""

    def __init__(self) -> None:
        super().__init__()
        self.module_depth = 0
        self.functional_calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if self.module_depth == 0 and func in _RELU_FUNCTIONS:
            self.functional_calls += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[None]:
    """Guided backprop on every `nn.ReLU` of `model` for the forward run inside the block.

    A forward hook puts a tensor hook on each ReLU output that keeps only positive gradients;
    the ReLU's own backward then gates by a positive forward input. Modules, their `inplace`
    flags and hook dictionaries are left as they were (hooks removed in `finally`). ReLUs
    applied functionally cannot be reached: they trigger a warning after the forward.
    """
    spy = _FunctionalReluSpy()

    def enter(module: nn.Module, args: Any) -> None:
        spy.module_depth += 1

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        spy.module_depth -= 1
        if isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(torch.relu)

    relus = [module for module in model.modules() if isinstance(module, nn.ReLU)]
    hooks: list[Hook] = [(relu, "forward_pre", enter) for relu in relus]
    hooks += [(relu, "forward", leave) for relu in relus]
    with scoped_hooks(hooks), spy:
        yield
    if spy.functional_calls:
        warnings.warn(
            f"{type(model).__name__} applied ReLU functionally (F.relu / torch.relu / "
            f".relu(), {spy.functional_calls} call(s) in one forward); guided backprop can only "
            "guide nn.ReLU modules, so gradients pass those ReLUs unguided. Use nn.ReLU modules "
            "for exact guided backprop and guided Grad-CAM.",
            stacklevel=3,
        )


def guided_backprop(
    model: nn.Module,
    score_fn: ScoreFn,
    batch: Batch,
    rows_per_pass: int | None = None,
) -> Tensor:
    """Guided backprop (Springenberg et al. 2015): input gradients `[B, C, H, W]` with guided ReLUs.

    `model` is the module whose `nn.ReLU`s are guided; `score_fn` runs it.
    """
    image = batch.require_image()
    result = torch.zeros_like(image.detach(), dtype=torch.float32)
    with guided_relus(model):
        for start, stop in pass_ranges(image.shape[0], rows_per_pass):
            index = torch.arange(start, stop, device=image.device)
            rows = image.detach()[index].requires_grad_(True)
            scores = score_fn(batch.with_image(rows, index), index)
            (grad,) = torch.autograd.grad(scores.sum(), rows)
            result[index] = grad.float()
    return result
