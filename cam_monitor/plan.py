"""What `compute_cams` resolves once per model and options (`Plan`): the layers and the CAM head
looked up, the passes the methods need, and the layouts of their outputs; `plan_for` keeps it
across calls while every layer name still leads to the same modules."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .attribution import SMOOTHGRAD_SAMPLES
from .layers import TokenLayout, as_spatial, is_glob, kept_as_is, resolve_layers, token_layout
from .methods import CAM_METHODS, GRADIENT_METHODS, INPUT_METHODS
from .options import EngineOptions
from .types import LayerSpec, Reshape


def resolve_layer_arg(
    module: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None, methods: tuple[str, ...]
) -> dict[str, nn.Module]:
    """Resolve `layers`; None or empty is fine only when every method works at input level."""
    if layers is None or (isinstance(layers, (list, tuple)) and not layers):
        needing = [m for m in methods if m not in INPUT_METHODS]
        if needing:
            raise ValueError(
                f"Method(s) {needing} need at least one layer; pass layers= (a name such as "
                "'features.29', a glob or a module). Only "
                f"{', '.join(sorted(INPUT_METHODS))} work without one."
            )
        return {}
    return dict(resolve_layers(module, layers))


def resolve_head(module: nn.Module, cam_head: LayerSpec | None) -> tuple[str, nn.Linear]:
    """The Linear classifier `cam` reads weights from: `cam_head`, else the model's last Linear."""
    if cam_head is None:
        linears = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"method 'cam' needs a global-average-pooling -> nn.Linear classifier, but "
                f"{type(module).__name__} has no nn.Linear. Use 'gradcam' (it equals CAM on "
                "such models and works on any architecture)."
            )
        return linears[-1]
    found = resolve_layers(module, [cam_head])
    if len(found) != 1:
        raise ValueError(
            f"cam_head={cam_head!r} matches {[n for n, _ in found]}; name one nn.Linear."
        )
    name, head = found[0]
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"cam_head={name!r} is a {type(head).__name__}, not an nn.Linear; pass the name of "
            "the linear classifier that reads the globally average-pooled features."
        )
    return name, head


@dataclass
class Plan:
    """What the options resolve to on this model (layers, CAM head) and which passes run."""

    layers: dict[str, nn.Module]
    head: tuple[str, nn.Linear] | None
    #: Whether gradients w.r.t. the layers are needed (gradient CAMs, guided Grad-CAM).
    layer_gradients: bool
    #: Whether layer gradients come from noisy copies (smooth=) rather than the clean pass.
    smooth_layers: bool
    #: Noisy copies per image for smoothed CAMs and SmoothGrad (0: no noisy passes).
    noisy_copies: int
    #: The requested gradient CAMs (`GRADIENT_METHODS`), in the order asked for.
    gradient_methods: tuple[str, ...] = ()
    #: Whether a pass beyond the clean forward and its one backward runs (noisy copies,
    #: integrated gradients, guided backprop, deconvnet).
    extra_passes: bool = False
    #: The (unwrapped) model the layers belong to.
    root: nn.Module | None = None
    #: Token layouts (`layers.token_layout`) of the layers with token outputs, found on first use.
    layouts: dict[str, TokenLayout] = field(default_factory=dict)
    #: `(layer, output shape, input size)` of outputs `as_spatial` keeps as they are, with
    #: what made it so (`_Kept`); shared by the calls of a cached plan.
    kept: dict[tuple[str, torch.Size, tuple[int, int] | None], _Kept] = field(default_factory=dict)

    def spatial(
        self,
        name: str,
        output: Tensor,
        reshape: Reshape | None,
        size: tuple[int, int] | None,
        batch: int | None = None,
    ) -> Tensor:
        """`output` of layer `name` (or its gradient) as `[B, C, h, w]` (`layers.as_spatial`),
        for `batch` images of `size`."""
        layer = self.layers[name]
        if reshape is None and (batch is None or output.shape[0] == batch):
            kept = self.kept.get((name, output.shape, size))
            if kept is not None and kept.holds(layer):
                return output
        layout = None
        if output.dim() == 3 and reshape is None and self.root is not None:
            layout = self.layouts.get(name)
            if layout is None:
                layout = self.layouts[name] = token_layout(self.root, name)
        spatial = as_spatial(name, output, reshape, size, layer, layout, batch)
        if spatial is output and reshape is None and output.dim() == 4:
            kept = _Kept.of(output.shape, size, layer)
            if kept is not None:
                if len(self.kept) >= _KEPT_SHAPES:
                    self.kept.clear()
                self.kept[name, output.shape, size] = kept
        return spatial

    @classmethod
    def make(
        cls,
        module: nn.Module,
        layers: LayerSpec | Sequence[LayerSpec] | None,
        options: EngineOptions,
    ) -> Plan:
        methods = options.methods
        resolved = resolve_layer_arg(module, layers, methods)
        head = resolve_head(module, options.cam_head) if "cam" in methods else None
        gradient_methods = any(m in GRADIENT_METHODS for m in methods)
        layer_gradients = bool(resolved) and (gradient_methods or "guided_gradcam" in methods)
        smooth_layers = options.smooth > 0 and layer_gradients
        noisy = smooth_layers or "smoothgrad" in methods
        return cls(
            layers=resolved,
            head=head,
            layer_gradients=layer_gradients,
            smooth_layers=smooth_layers,
            noisy_copies=(options.smooth or SMOOTHGRAD_SAMPLES) if noisy else 0,
            gradient_methods=tuple(m for m in methods if m in GRADIENT_METHODS),
            extra_passes=noisy or not _CLEAN_ONLY.issuperset(methods),
            root=module,
        )


#: Methods the clean pass alone serves (with `smooth=0`): no scorer, no extra pass.
_CLEAN_ONLY = CAM_METHODS | {"saliency"}

#: Output shapes a plan remembers the layout of, at most (a probe of ever new sizes).
_KEPT_SHAPES = 64


@dataclass(frozen=True)
class _Kept:
    """Why `as_spatial` kept a 4-D output as it is, so that it may skip the reading next time:
    its shape alone (`layers.kept_as_is`), or, where the shape reads both channels-first and
    channels-last, a layer of this type without submodules that is no LayerNorm or Linear
    (which reads channels-first while it has no submodules)."""

    leaf: type[nn.Module] | None = None

    @staticmethod
    def of(shape: torch.Size, size: tuple[int, int] | None, layer: nn.Module) -> _Kept | None:
        if kept_as_is(shape, size):
            return _BY_SHAPE
        if layer._modules or isinstance(layer, (nn.LayerNorm, nn.Linear)):
            return None
        return _Kept(type(layer))

    def holds(self, layer: nn.Module) -> bool:
        """Whether the reason still holds for `layer`."""
        return self.leaf is None or (type(layer) is self.leaf and not layer._modules)


_BY_SHAPE = _Kept()


@dataclass(frozen=True)
class CachedPlan:
    """A plan without its model: the names it resolved, weak references to the modules on each
    name's path, and what it derived from the options.

    Valid while `getattr` along each dotted name meets the same modules, which is what
    `get_submodule`, all a lookup of full dotted names reads, would return: a replaced or
    renamed submodule, on the path or at its end, makes a new plan. Weak references, so the
    cache keeps no model alive (a submodule may refer back to its parent).
    """

    #: `(name, its atoms, a weak reference to the module at each atom)`, the layers' then the
    #: CAM head's.
    paths: tuple[tuple[str, tuple[str, ...], tuple[weakref.ref[nn.Module], ...]], ...]
    head: bool
    #: The plan's other fields (what it derived from the options, and `kept`, shared).
    shared: dict[str, Any]

    @staticmethod
    def of(root: nn.Module, plan: Plan) -> CachedPlan:
        paths = []
        named = list(plan.layers.items()) + ([plan.head] if plan.head is not None else [])
        for name, _ in named:
            atoms = tuple(name.split("."))
            steps = [root.get_submodule(".".join(atoms[: i + 1])) for i in range(len(atoms))]
            paths.append((name, atoms, tuple(weakref.ref(step) for step in steps)))
        shared = {
            name: value for name, value in vars(plan).items() if name not in _PER_MODEL_FIELDS
        }
        return CachedPlan(paths=tuple(paths), head=plan.head is not None, shared=shared)

    def on(self, root: nn.Module) -> Plan | None:
        """The plan for `root` if its modules are still where they were, else None."""
        found: list[tuple[str, nn.Module]] = []
        for name, atoms, refs in self.paths:
            module = root
            for atom, ref in zip(atoms, refs, strict=True):
                try:
                    module = getattr(module, atom)
                except AttributeError:
                    return None
                if module is not ref():
                    return None
            found.append((name, module))
        head = None
        if self.head:
            head = found.pop()
            assert isinstance(head[1], nn.Linear)
        plan = object.__new__(Plan)  # the shared table copied in: no `__init__` per call
        fields = plan.__dict__
        fields.update(self.shared)
        fields["layers"], fields["head"], fields["root"], fields["layouts"] = (
            dict(found),
            head,
            root,
            {},
        )
        return plan


#: The fields of a `Plan` that hold the model's modules (looked up again at every call) or are
#: filled per call (`layouts`); `CachedPlan` shares the others.
_PER_MODEL_FIELDS = frozenset({"layers", "head", "root", "layouts"})
#: Plans per model and `_plan_key`: the layer look-up and what the options imply, done once.
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], CachedPlan]] = (
    weakref.WeakKeyDictionary()
)


def _plan_key(
    layers: LayerSpec | Sequence[LayerSpec] | None, options: EngineOptions
) -> tuple[Any, ...] | None:
    """What a plan depends on besides the model, where the layers (and the CAM head) are given
    by name (None: modules or a default CAM head). Whether those names are full dotted names is
    checked when a plan is kept (`plan_for`)."""
    specs: tuple[Any, ...]
    if layers is None:
        specs = ()
    elif type(layers) is str:
        specs = (layers,)
    elif isinstance(layers, (list, tuple)) and all(type(spec) is str for spec in layers):
        specs = tuple(layers)
    else:
        return None
    if "cam" not in options.methods:
        return specs, options.methods, None, options.smooth
    if type(options.cam_head) is not str:
        return None
    return specs, options.methods, options.cam_head, options.smooth


def plan_for(
    module: nn.Module, layers: LayerSpec | Sequence[LayerSpec] | None, options: EngineOptions
) -> Plan:
    """The plan of `layers` and `options` on `module`: the cached one while valid."""
    key = _plan_key(layers, options)
    if key is None:
        return Plan.make(module, layers, options)
    plans = _PLANS.get(module)
    cached = plans.get(key) if plans is not None else None
    plan = cached.on(module) if cached is not None else None
    if plan is not None:
        return plan
    plan = Plan.make(module, layers, options)
    specs, head = key[0], key[2]
    exact = (
        type(module).get_submodule is nn.Module.get_submodule
        and tuple(plan.layers) == tuple(dict.fromkeys(specs))
        and (plan.head is None or plan.head[0] == head)
        and not any(is_glob(spec) for spec in (*specs, *([head] if head else [])))
    )
    if exact:  # every name found as given, by `get_submodule` (no glob, no suffix match)
        if plans is None:
            plans = _PLANS.setdefault(module, {})
        plans[key] = CachedPlan.of(module, plan)
    return plan
