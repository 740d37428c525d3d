"""Find layers: the names a user gives (dotted names, globs, modules), looked up, not guessed.

Models are unwrapped first (DDP, DataParallel, `torch.compile`); layer outputs are viewed as
spatial maps `[B, C, h, w]` here too. The layer chosen when none is given: `default_layer`.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .types import LayerSpec, Reshape

_GLOB_CHARS = re.compile(r"[*?\[]")


def is_glob(name: str) -> bool:
    """Whether a layer name is a glob pattern (`*`, `?`, `[...]`) rather than a dotted name.

    Example:
        >>> is_glob("features.*"), is_glob("features.29")
        (True, False)
    """
    return _GLOB_CHARS.search(name) is not None


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel (`.module`) and `torch.compile` (`._orig_mod`) wrappers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> unwrap_model(nn.DataParallel(net)) is net
        True
    """
    while True:
        inner = _compiled_inner(model)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        if isinstance(model, wrappers):
            model = model.module
            continue
        return model


def _compiled_inner(model: nn.Module) -> object:
    """`getattr(model, "_orig_mod", None)`, read from `model._modules` where that is where the
    attribute lookup would find it (no exception raised and caught on every call)."""
    kind = type(model)
    if (
        kind.__getattr__ is _MODULE_GETATTR
        and kind.__getattribute__ is _OBJECT_GETATTRIBUTE
        and "_orig_mod" not in model.__dict__
        and not hasattr(kind, "_orig_mod")
    ):
        # What `Module.__getattr__` would find: a Parameter or buffer of that name is no Module.
        return model.__dict__.get("_modules", {}).get("_orig_mod")
    return getattr(model, "_orig_mod", None)


_MODULE_GETATTR = nn.Module.__getattr__
_OBJECT_GETATTRIBUTE = object.__getattribute__


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`*` and `?` stay inside one dotted segment; `**` crosses segments."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i)
            if end == -1:
                out.append(re.escape(pattern[i]))
                i += 1
            else:
                out.append(pattern[i : end + 1].replace("[!", "[^"))
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _not_found(asked: str, names: list[str], model: nn.Module) -> ValueError:
    close = difflib.get_close_matches(asked, names, n=3, cutoff=0.0)
    hint = ", ".join(repr(c) for c in close) if close else "(the model has no submodules)"
    return ValueError(
        f"No layer named {asked!r} in {type(model).__name__}. Closest names: {hint}. "
        "Use a name from model.named_modules()."
    )


def _by_suffix(asked: str, names: list[str], model: nn.Module) -> str:
    """The one name ending in `.asked` (a net wrapped as `self.model` in a LightningModule)."""
    matches = [n for n in names if n.endswith("." + asked)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(
            f"Layer name {asked!r} is ambiguous in {type(model).__name__}: it ends "
            f"{', '.join(repr(m) for m in matches)}. Pass the full dotted name."
        )
    raise _not_found(asked, names, model)


def _glob_by_suffix(
    asked: str, regex: re.Pattern[str], names: list[str], model: nn.Module
) -> list[str]:
    """The names whose ending after one prefix matches the glob (`"features.*"` for
    `net.features.0`, ... in a LightningModule holding the net as `self.net`), as a plain name
    resolves by suffix; refused where the endings sit under several prefixes."""
    by_prefix: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        for cut in range(1, len(parts)):
            if regex.match(".".join(parts[cut:])):
                by_prefix.setdefault(".".join(parts[:cut]), []).append(name)
                break
    if len(by_prefix) > 1:
        prefixes = ", ".join(f"{p + '.' + asked!r}" for p in by_prefix)
        raise ValueError(
            f"Layer glob {asked!r} is ambiguous in {type(model).__name__}: it matches under "
            f"{len(by_prefix)} prefixes; pass one of {prefixes}."
        )
    if not by_prefix:
        raise _not_found(asked, names, model)
    return next(iter(by_prefix.values()))


def resolve_layers(
    model: nn.Module, layers: LayerSpec | Sequence[LayerSpec]
) -> list[tuple[str, nn.Module]]:
    """Return `(name, module)` for each requested layer, in the order asked, without repeats.

    Names are looked up after unwrapping DDP and `torch.compile`. A name that is not exact but
    ends exactly one module's dotted name (`"features.29"` for `model.features.29`) resolves to
    it. A glob such as `"features.*"` matches within one dotted segment (`**` crosses segments);
    one that matches no full name matches the names it ends, under one prefix.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
        >>> [name for name, _ in resolve_layers(net, "*")]
        ['0', '1', '2']
    """
    model = unwrap_model(model)
    specs: Iterable[LayerSpec] = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    exact = _exact_names(model, specs)
    if exact is not None:
        return exact
    named = {name: module for name, module in model.named_modules() if name}
    names = list(named)
    by_identity = {id(module): name for name, module in named.items()}
    found: dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            name = by_identity.get(id(spec))
            if name is None:
                raise ValueError(
                    f"The module {type(spec).__name__} passed as a layer is not a submodule of "
                    f"{type(model).__name__}. Pass a module from model.named_modules() or its name."
                )
            found.setdefault(name, spec)
        elif isinstance(spec, str):
            if _GLOB_CHARS.search(spec):
                regex = _glob_to_regex(spec)
                matches = [n for n in names if regex.match(n)] or _glob_by_suffix(
                    spec, regex, names, model
                )
                for name in matches:
                    found.setdefault(name, named[name])
            elif spec in named:
                found.setdefault(spec, named[spec])
            else:
                name = _by_suffix(spec, names, model)
                found.setdefault(name, named[name])
        else:
            raise TypeError(
                f"A layer must be a name, a glob or an nn.Module, got {type(spec).__name__}."
            )
    if not found:
        raise ValueError("No layer given: pass at least one layer name, glob or module.")
    return list(found.items())


def _exact_names(
    model: nn.Module, specs: Iterable[LayerSpec]
) -> list[tuple[str, nn.Module]] | None:
    """The layers when every spec is a full dotted name (no walk over the whole model: a
    CAM call on a GPU is bound by such host work); None when one is anything else."""
    found: dict[str, nn.Module] = {}
    for spec in specs:
        if not isinstance(spec, str) or not spec or _GLOB_CHARS.search(spec):
            return None
        try:
            found.setdefault(spec, model.get_submodule(spec))
        except AttributeError:
            return None
    return list(found.items()) or None


def _fits(rows: int, cols: int, size: tuple[int, int]) -> bool:
    """Whether a `rows x cols` grid is the input `size` downsampled by one stride `s`, each side
    within one cell of `H / s` and `W / s` (padding and rounding)."""
    height, width = size
    if rows < 1 or cols < 1:
        return False
    low = max(height / (rows + 1), width / (cols + 1))
    high = min(
        height / (rows - 1) if rows > 1 else math.inf, width / (cols - 1) if cols > 1 else math.inf
    )
    return low < high


def _acts_on_last_dim(module: nn.Module | None, channels: int) -> bool | None:
    """Whether `module` works on the last axis: True for a plain LayerNorm or Linear over
    `channels`, False for a module holding neither (or no module), None when unknown."""
    if module is None:
        return False
    if type(module) is nn.LayerNorm:
        return tuple(module.normalized_shape) == (channels,)
    if type(module) is nn.Linear:
        return module.out_features == channels
    if any(isinstance(m, (nn.LayerNorm, nn.Linear)) for m in module.modules()):
        return None
    return False


def _channels_last(
    name: str, output: Tensor, size: tuple[int, int] | None, module: nn.Module | None
) -> bool:
    """Whether a 4-D output is `[B, h, w, C]`: only where its shape and the input say so."""
    if size is None:
        return False
    _, first, second, last = output.shape
    as_first, as_last = _fits(second, last, size), _fits(first, second, size)
    if as_last and not as_first:
        return True
    if not (as_first and as_last):
        return False
    evidence = _acts_on_last_dim(module, last)
    if evidence is None:
        raise ValueError(
            f"Layer {name!r} outputs {tuple(output.shape)} for a {size[0]}x{size[1]} input: it "
            f"reads both as channels-first [B, C, H, W] and as channels-last [B, H, W, C]. "
            "Pass reshape= to say which, e.g. reshape=lambda t: t.permute(0, 3, 1, 2) for "
            "channels-last, or reshape=lambda t: t for channels-first."
        )
    return evidence


#: 1-D pooling: its `[B, C, 1]` output reads as C tokens one value wide, which are no grid.
POOLING_1D = (nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AvgPool1d, nn.MaxPool1d)


@dataclass(frozen=True)
class TokenLayout:
    """How a layer's tokens `[B, N, C]` sit on the patch grid, as the model declares it.

    `prefix`: the tokens before the patches (class, distillation, registers), None where the
    model does not say; `patch`: its patch size `(h, w)`, None where it does not say; `reroll`:
    where the patches are not in row-major order, what puts `[B, N, C]` on the grid as
    `[B, C, h, w]` (None for a token count it does not know).
    """

    prefix: int | None = None
    patch: tuple[int, int] | None = None
    reroll: Callable[[Tensor], Tensor | None] | None = field(
        default=None, repr=False, compare=False
    )


#: Parameters that are prefix tokens (timm, torchvision, Hugging Face names), each `[1, n, C]`
#: (CLIP's `class_embedding`: one token, `[C]`).
_TOKEN_PARAMETERS = frozenset(
    {"cls_token", "class_token", "class_embedding", "dist_token", "distillation_token",
     "reg_token", "register_tokens"}
)  # fmt: skip


def token_layout(model: nn.Module, name: str) -> TokenLayout:
    """The token layout of layer `name`: what the layer or its nearest ancestor declares.

    The prefix count is a `num_prefix_tokens` attribute (timm), else the sizes of the prefix
    token parameters (`cls_token`, `class_token`, `class_embedding`, `dist_token`,
    `distillation_token`, `reg_token`, `register_tokens`) of that module or its direct children
    (torchvision, Hugging Face); the patch size is its `patch_size` (or
    `patch_embed.patch_size`, `config.patch_size`).

    Example:
        >>> import torchvision
        >>> vit = torchvision.models.VisionTransformer(64, 16, 1, 2, 8, 16)
        >>> token_layout(vit, "encoder.layers.encoder_layer_0.ln_1")
        TokenLayout(prefix=1, patch=(16, 16))
    """
    parts = name.split(".") if name else []
    prefix: int | None = None
    patch: tuple[int, int] | None = None
    reroll: Callable[[Tensor], Tensor | None] | None = None
    for depth in range(len(parts), -1, -1):
        try:
            owner = model.get_submodule(".".join(parts[:depth]))
        except AttributeError:
            continue
        prefix = _declared_prefix(owner) if prefix is None else prefix
        patch = _declared_patch(owner) if patch is None else patch
        reroll = _declared_reroll(owner, parts[depth:]) if reroll is None else reroll
    return TokenLayout(prefix, patch, reroll)


def _declared_reroll(
    owner: nn.Module, below: Sequence[str]
) -> Callable[[Tensor], Tensor | None] | None:
    """What puts the tokens of a timm Hiera's layer `owner.<below>` back on the grid, or None
    for other models and for its layers before the unrolling (the patch embedding).

    Hiera keeps its tokens in mask-unit order from its `unroll` until its last stage; its
    `reroll` module (what timm's `forward_intermediates` uses) restores row-major order for a
    block index. The stage, and so the order, follows from the token count: each stage's grid
    is smaller.
    """
    if not below or below[0] not in ("unroll", "blocks"):
        return None
    module = getattr(owner, "reroll", None)
    schedules = getattr(module, "schedule", None)
    if not (isinstance(module, nn.Module) and type(module).__name__ == "Reroll"):
        return None
    if not isinstance(schedules, dict):
        return None
    by_count = {}
    for block, (strides, size) in schedules.items():
        if len(size) == 2:
            by_count.setdefault(math.prod(size), (block, bool(strides)))

    def reroll(tokens: Tensor) -> Tensor | None:
        found = by_count.get(tokens.shape[1])
        if found is None or tokens.dim() != 3:
            return None
        block, unrolled = found
        if not unrolled:  # the last stages: already row-major
            return None
        return module(tokens.contiguous(), block).permute(0, 3, 1, 2)

    return reroll


def _declared_prefix(owner: nn.Module) -> int | None:
    """The prefix token count `owner` declares, or None."""
    count = getattr(owner, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    sizes = [
        int(parameter.shape[-2]) if parameter.dim() >= 2 else 1
        for module in (owner, *owner.children())
        for key, parameter in module.named_parameters(recurse=False)
        if key in _TOKEN_PARAMETERS
    ]
    return sum(sizes) if sizes else None


def _declared_patch(owner: nn.Module) -> tuple[int, int] | None:
    """The patch size `owner` declares, or None."""
    for source in (owner, getattr(owner, "patch_embed", None), getattr(owner, "config", None)):
        size = getattr(source, "patch_size", None)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size, size
        if (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(side, int) and side > 0 for side in size)
        ):
            return int(size[0]), int(size[1])
    return None


def _prefix_counts(
    tokens: int, size: tuple[int, int] | None, layout: TokenLayout
) -> tuple[int, ...]:
    """The prefix counts a token output may have where the model declares none: the one the
    input and patch sizes leave (fewer prefix tokens than patches), else 0 or 1 (none, a class
    token)."""
    if layout.patch is not None and size is not None:
        for rounding in (math.floor, math.ceil):
            cells = rounding(size[0] / layout.patch[0]) * rounding(size[1] / layout.patch[1])
            if 0 <= tokens - cells < cells:
                return (tokens - cells,)
    return (0, 1)


def _token_grid(
    tokens: int, size: tuple[int, int] | None, layout: TokenLayout
) -> tuple[int, int, int] | None:
    """`(skip, rows, cols)`: tokens on a grid after `skip` prefix tokens, shaped like the input.

    A declared prefix is tried first, then none (the patch embedding's output, before the
    prefix tokens join). A grid of the input's aspect is preferred; a square one is the fallback
    where no input size is known, or after a declared prefix (a model that resizes its input):
    a count of tokens merely guessed to be square is no evidence of a grid.
    """
    if layout.prefix is None:
        skips = _prefix_counts(tokens, size, layout)
        if size is not None:
            return _token_grid_like(tokens, size, skips)
        return _square_grid(tokens, skips)
    if size is not None:
        for skip in dict.fromkeys((layout.prefix, 0)):
            shaped = _token_grid_like(tokens, size, (skip,))
            if shaped is not None:
                return shaped
        return _square_grid(tokens, (layout.prefix,))
    return _square_grid(tokens, tuple(dict.fromkeys((layout.prefix, 0))))


def _square_grid(tokens: int, skips: tuple[int, ...]) -> tuple[int, int, int] | None:
    """`(skip, side, side)` for the first prefix count in `skips` that leaves a square."""
    for skip in skips:
        count = tokens - skip
        side = round(count**0.5) if count > 0 else 0
        if side > 0 and side * side == count:
            return skip, side, side
    return None


def _token_grid_like(
    tokens: int, size: tuple[int, int], skips: tuple[int, ...]
) -> tuple[int, int, int] | None:
    """`(skip, rows, cols)` with `rows x cols` the input's shape downsampled, the closest in
    aspect over the possible prefix counts `skips`, if any. One patch size for both sides makes
    the grid square on a square input and no taller than wide on a wide one."""
    ratio = size[0] / size[1]
    height, width = size
    found = [
        (skip, rows, (tokens - skip) // rows)
        for skip in skips
        for rows in range(1, tokens - skip + 1)
        if (tokens - skip) % rows == 0 and _fits(rows, (tokens - skip) // rows, size)
    ]
    found = [
        (skip, rows, cols)
        for skip, rows, cols in found
        if not (height == width and rows != cols) and (rows - cols) * (height - width) >= 0
    ]
    if not found:
        return None
    return min(found, key=lambda grid: abs(math.log(grid[1] / grid[2] / ratio)))


def kept_as_is(shape: Sequence[int], size: tuple[int, int] | None) -> bool:
    """Whether `as_spatial` (without `reshape`) returns any layer's output of this `shape` as it
    is, for an input of `size`: a 4-D output that only reads as a channels-first grid of the
    input (or any 4-D output where the input size is unknown). The layer is not consulted.

    Example:
        >>> kept_as_is((2, 64, 8, 8), (32, 32)), kept_as_is((2, 8, 8, 64), (32, 32))
        (True, False)
    """
    if len(shape) != 4:
        return False
    if size is None:
        return True
    return _fits(shape[2], shape[3], size) and not _fits(shape[1], shape[2], size)


def as_spatial(
    name: str,
    output: Tensor,
    reshape: Reshape | None = None,
    input_size: tuple[int, int] | None = None,
    module: nn.Module | None = None,
    layout: TokenLayout | None = None,
    batch: int | None = None,
) -> Tensor:
    """View a layer output as `[B, C, h, w]`: via `reshape`, as is, from channels-last, or tokens.

    With `input_size` (the probe's `(H, W)`), a 4-D output whose last three sizes read as an
    `h x w` grid of the input's shape followed by channels (`[B, h, w, C]`: Swin stages,
    ConvNeXt's inner blocks) is permuted; where both layouts fit the input (C equal to the grid
    side), a `module` that is a LayerNorm or Linear over C says channels-last, one without those
    channels-first, and otherwise a `ValueError` asks for `reshape=`. A 4-D output that is a grid
    of the input's shape neither way (attention's `[B, heads, tokens, dim]`) is refused. Tokens
    `[B, N, C]` are accepted on a grid of the input's shape (square without `input_size`) after
    the prefix tokens (class, distillation, registers) that `layout` (`token_layout`) declares,
    which are dropped (or none: the patch embedding's output); where the model declares none,
    after 0 or 1 token. A pooler's output one value wide (`[B, C, 1]`, what a 1-D pooling
    leaves) is refused. With `batch` (the number of images), an output (or what `reshape`
    returns) whose first axis is not the batch (sequence-first tokens `[N, B, C]`) is refused.

    Example:
        >>> import torch
        >>> as_spatial("blocks.0", torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
        >>> as_spatial("blocks.0", torch.zeros(2, 5 + 16, 8), layout=TokenLayout(prefix=5)).shape
        torch.Size([2, 8, 4, 4])
        >>> as_spatial("stage.1", torch.zeros(2, 4, 6, 96), input_size=(32, 48)).shape
        torch.Size([2, 96, 4, 6])
    """
    if reshape is not None:
        output = reshape(output)
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"reshape() must return a [B, C, H, W] tensor for layer {name!r}, got {shape}."
            )
        if batch is not None and output.shape[0] != batch:
            raise ValueError(
                f"reshape() returned {tuple(output.shape)} for layer {name!r} on a batch of "
                f"{batch}; its first axis must be the batch: [B, C, H, W]."
            )
        return output
    if batch is not None and output.dim() and output.shape[0] != batch:
        raise not_batch_first(name, output, batch)
    if output.dim() == 4:
        if _channels_last(name, output, input_size, module):
            return output.permute(0, 3, 1, 2)
        if input_size is not None and not _fits(output.shape[2], output.shape[3], input_size):
            raise ValueError(
                f"Layer {name!r} outputs {tuple(output.shape)} for a {input_size[0]}x"
                f"{input_size[1]} input: neither [B, C, h, w] nor [B, h, w, C] is a grid of the "
                "input's shape (an attention tensor [B, heads, tokens, dim]?). Pick a layer "
                "whose output is the image's grid or tokens (for a ViT, the last block's norm1 "
                "or ln_1), or pass reshape= to turn this output into [B, C, H, W] (reshape="
                "lambda t: t if it is one, with a different stride on each side)."
            )
        return output
    if output.dim() == 3:
        rows_of_images, tokens, channels = output.shape
        if channels == 1 and (
            isinstance(module, POOLING_1D) or type(module).__name__.endswith("Pooler")
        ):
            raise ValueError(
                f"Layer {name!r} outputs {tuple(output.shape)}: one value per token, which is "
                "what a 1-D pooling leaves ([B, C, 1], a pooler), not tokens [B, N, C] on the "
                "image's grid. Pick the layer before the pooling (the last norm, e.g. a Swin's "
                "layernorm), or pass reshape= to turn this output into [B, C, H, W]."
            )
        layout = layout or TokenLayout()
        rerolled = layout.reroll(output) if layout.reroll is not None else None
        if rerolled is not None:
            return rerolled
        grid = _token_grid(tokens, input_size, layout)
        if grid is not None:
            skip, rows, cols = grid
            return output[:, skip:, :].transpose(1, 2).reshape(rows_of_images, channels, rows, cols)
        if layout.prefix is not None:
            where = "" if input_size is None else f" of a {input_size[0]}x{input_size[1]} input"
            raise ValueError(
                f"Layer {name!r} outputs tokens {tuple(output.shape)}; after the model's "
                f"{layout.prefix} prefix tokens (its num_prefix_tokens: class, distillation, "
                f"registers) the other {tokens - layout.prefix} are not a grid{where}, nor are "
                f"all {tokens}. Pass reshape= to turn this output into [B, C, H, W]."
            )
    raise ValueError(
        f"Layer {name!r} outputs shape {tuple(output.shape)}; a CAM needs a spatial map "
        "[B, C, H, W] (or [B, H, W, C]) or tokens [B, N, C] on a grid of the input's shape "
        "(after the prefix tokens the model declares in num_prefix_tokens or as cls_token, "
        "dist_token, register_tokens parameters; else after none or one class token). Pick a "
        "convolutional layer, or pass reshape= to turn this output into [B, C, H, W]."
    )


def not_batch_first(name: str, output: Tensor, batch: int) -> ValueError:
    """The error for a layer output whose first axis is not the batch of `batch` images."""
    shape = tuple(output.shape)
    example = ""
    if output.dim() == 3 and output.shape[1] == batch:
        example = (
            ", e.g. for these [N, B, C] tokens after one class token on an h x w grid: "
            "reshape=lambda t: t[1:].permute(1, 2, 0).unflatten(2, (h, w))"
        )
    return ValueError(
        f"Layer {name!r} outputs {shape} for a batch of {batch}: its first axis is not the "
        "batch, so it holds no map per image. Sequence-first tokens [N, B, C] "
        "(nn.TransformerEncoder or nn.MultiheadAttention with batch_first=False) or a batch "
        "folded with another axis (frames, crops) give this. Pick a batch-first layer, or pass "
        f"reshape= to turn this output into [B, C, H, W]{example}."
    )
