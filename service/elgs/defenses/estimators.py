"""Saliency estimators for SLGS and WLGS, and the one batched pass that computes them (issue 9).

``gradient`` is the paper's map (DESIGN 2.3): ``S = max_c |dL/dx|`` for the summed cross entropy of
the image's own top-5 classes. ``smoothgrad`` (Smilkov et al. 2017) averages that map over ``n``
copies of the image, the clean image itself and ``n - 1`` copies with Gaussian noise of standard
deviation ``sigma`` in pixel units (the [0, 1] range; not clipped). Every copy uses the top-5 classes of the
*clean* image, so ``smoothgrad`` with ``n = 1`` is ``gradient`` bit for bit. The noise comes from a
generator seeded with ``seed`` (0 by default), the same for every image: a request's map depends
only on its own image and its spec, never on its batch-mates.

``rectify`` is an option of both: on networks with clipped activations (``nn.ReLU6``,
``nn.Hardtanh``) the backward pass lets the gradient through wherever the input is above the
lower clip, as a ReLU would, instead of stopping it above the upper clip. The forward pass is
unchanged bit for bit. A strong patch drives many ReLU6 units into their upper clip, which makes
it invisible to the plain gradient; rectifying lets the saliency see it. Only activation
*modules* are rectified (functional ``F.relu6`` calls inside ``forward`` cannot be hooked).

A spec is written ``name[:key=value[,key=value...]]``, for example ``gradient``,
``smoothgrad:n=4,sigma=0.2,rectify=true``. :func:`parse_saliency` checks it and returns a
:class:`SaliencyConfig`; ``config.spec`` is the canonical form with every parameter spelled out.
``quantile`` is how WLGS normalises this saliency into weights (see :func:`robust_normalize`);
``1`` is the paper's min-max.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from elgs.defenses._checks import check_image_batch
from elgs.defenses.gradients import scale_to_unit
from elgs.defenses.saliency import classes_loss, gradient_magnitude
from elgs.registry import Registry

N_RANGE = (1, 32)
SIGMA_RANGE = (0.0, 1.0)
QUANTILE_RANGE = (0.5, 1.0)
SEED_RANGE = (0, 2**31 - 1)


@dataclass(frozen=True)
class SaliencyParameter:
    """One parameter of an estimator: its type, range and default (for validation and ``GET /defenses``)."""

    name: str
    kind: type
    default: float | int | bool
    minimum: float | None = None
    maximum: float | None = None
    description: str = ""

    def describe(self) -> dict:
        described = {"type": self.kind.__name__, "default": self.default, "description": self.description}
        if self.minimum is not None:
            described.update(minimum=self.minimum, maximum=self.maximum)
        return described

    def parse(self, text: str) -> float | int | bool:
        """``text`` as this parameter's value; ``ValueError`` naming the bad value otherwise."""
        if self.kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{self.name} must be true or false, got {text!r}")
        try:
            value = self.kind(text) if self.kind is not int else int(text, 10)
        except ValueError:
            raise ValueError(f"{self.name} must be {'an integer' if self.kind is int else 'a number'}, "
                             f"got {text!r}") from None
        return self.check(value)

    def check(self, value: float | int | bool) -> float | int | bool:
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.kind is int and (isinstance(value, bool) or value != int(value)):
            raise ValueError(f"{self.name} must be an integer, got {value!r}")
        value = self.kind(value)
        if not math.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise ValueError(f"{self.name} must be in [{self.minimum:g}, {self.maximum:g}], got {value}")
        return value


_RECTIFY = SaliencyParameter(
    "rectify", bool, False,
    description="backward of ReLU6/Hardtanh passes the gradient wherever the input is above the lower clip")
_N = SaliencyParameter("n", int, 4, *N_RANGE, description="copies averaged, the clean image included")
_SIGMA = SaliencyParameter("sigma", float, 0.2, *SIGMA_RANGE, description="noise std in pixel units ([0, 1] range)")
_SEED = SaliencyParameter("seed", int, 0, *SEED_RANGE, description="seed of the noise (same for every image)")


def _quantile(default: float) -> SaliencyParameter:
    return SaliencyParameter("quantile", float, default, *QUANTILE_RANGE,
                             description="WLGS weights: S scaled by this per-image quantile, clamped to 1 "
                                         "(1 = the paper's min-max)")


@dataclass(frozen=True)
class SaliencyEstimator:
    """A registered saliency estimator.

    Attributes:
        name: the name used in specs, the API and the CLI.
        summary: one line for help texts and ``GET /defenses``.
        parameters: what a spec may set, with defaults and ranges.
    """

    name: str
    summary: str
    parameters: tuple[SaliencyParameter, ...]

    def describe(self) -> dict:
        """A JSON-ready description with parameter ranges and defaults."""
        return {"name": self.name, "summary": self.summary,
                "parameters": {p.name: p.describe() for p in self.parameters}}


@dataclass(frozen=True)
class SaliencyConfig:
    """A resolved saliency spec: which estimator and every parameter's value.

    Attributes:
        estimator: registered estimator name.
        n: copies averaged (the clean image counts as one); 1 for ``gradient``.
        sigma: noise std in pixel units; 0 for ``gradient``.
        rectify: ReLU-like backward through clipped activations.
        seed: noise seed.
        quantile: WLGS weight normalisation quantile (1 = min-max).
    """

    estimator: str = "gradient"
    n: int = 1
    sigma: float = 0.0
    rectify: bool = False
    seed: int = 0
    quantile: float = 1.0

    @property
    def spec(self) -> str:
        """Canonical spec, every parameter of the estimator spelled out (parses back to this config)."""
        estimator = get_estimator(self.estimator)
        values = []
        for parameter in estimator.parameters:
            value = getattr(self, parameter.name)
            values.append(f"{parameter.name}={str(value).lower() if isinstance(value, bool) else format(value, 'g')}")
        return f"{self.estimator}:{','.join(values)}"


ESTIMATORS: Registry[SaliencyEstimator] = Registry("saliency estimator")


def register_estimator(estimator: SaliencyEstimator) -> SaliencyEstimator:
    """Add ``estimator`` to the registry; names are unique."""
    return ESTIMATORS.register(estimator)


def get_estimator(name: str) -> SaliencyEstimator:
    """The estimator called ``name``; ``KeyError`` naming the choices otherwise."""
    return ESTIMATORS.find(name)


def estimator_names() -> list[str]:
    """Registered estimator names in registration order."""
    return ESTIMATORS.names()


register_estimator(SaliencyEstimator(
    name="gradient",
    summary="the paper's map: max over channels of |dL/dx|, L the top-5 cross entropy (DESIGN 2.3)",
    parameters=(_RECTIFY, _quantile(1.0)),
))
register_estimator(SaliencyEstimator(
    name="smoothgrad",
    summary="SmoothGrad: the gradient map averaged over the clean image and n-1 noisy copies, "
            "all in the one pass-1 model call (pass 1 costs n times the images)",
    parameters=(_N, _SIGMA, _RECTIFY, _SEED, _quantile(0.9)),
))


def parse_saliency(spec: str | SaliencyConfig, *, base: str | SaliencyConfig | None = None) -> SaliencyConfig:
    """Check a spec ``name[:key=value,...]`` and fill its defaults.

    Args:
        spec: e.g. ``"smoothgrad:n=4,sigma=0.2,rectify=true"``, or a config (returned re-checked).
        base: when ``spec`` names the same estimator as ``base``, unspecified parameters come from
            ``base`` instead of the estimator's defaults (so ``gradient:rectify=false`` on a model whose
            default is a rectified gradient changes only ``rectify``). None: the estimator's defaults.

    Returns:
        the resolved :class:`SaliencyConfig`.

    Raises:
        ValueError: unknown estimator or parameter, or a value out of its range; the message names it.
    """
    if isinstance(spec, SaliencyConfig):
        spec = spec.spec
    if not isinstance(spec, str):
        raise TypeError(f"saliency spec must be a string, got {type(spec).__name__}")
    name, _, arguments = spec.strip().partition(":")
    name = name.strip()
    if name not in ESTIMATORS:
        raise ValueError(f"unknown saliency estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    estimator = ESTIMATORS[name]
    parameters = {p.name: p for p in estimator.parameters}
    values = {p.name: p.default for p in estimator.parameters}
    if base is not None:
        base_config = parse_saliency(base)
        if base_config.estimator == name:
            values = {key: getattr(base_config, key) for key in values}
    given: set[str] = set()
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals:
            raise ValueError(f"saliency parameter {item!r} must be written key=value")
        if key not in parameters:
            raise ValueError(f"{name} has no parameter {key!r}; it takes {', '.join(parameters)}")
        if key in given:  # the last would win silently
            raise ValueError(f"{name} parameter {key!r} is given twice; give each parameter once")
        given.add(key)
        values[key] = parameters[key].parse(text.strip())
    config = SaliencyConfig(estimator=name, **values)
    if name == "gradient":
        config = replace(config, n=1, sigma=0.0)
    return config


# --- rectified backward through clipped activations ---------------------------------------------


class _RectifiedClip(torch.autograd.Function):
    """Identity on a clipped activation's output whose backward skips the activation's own and gates the
    gradient by :func:`rectified_gate`, read off the output (``min < out`` iff ``min < in``, and
    ``out < max`` iff ``in < max``) with the fused kernels of ReLU and Hardtanh: the rectified backward
    costs what the plain one does."""

    @staticmethod
    def forward(ctx, input: torch.Tensor, output: torch.Tensor, min_val: float, max_val: float,  # noqa: A002
                rows: torch.Tensor | None) -> torch.Tensor:
        ctx.min_val, ctx.max_val = min_val, max_val
        ctx.save_for_backward(output, rows)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        output, rows = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad_output, output, ctx.min_val)
        if rows is not None:
            own = torch.ops.aten.hardtanh_backward(grad_output, output, ctx.min_val, ctx.max_val)
            grad = torch.where(rows.view(-1, *([1] * (grad.ndim - 1))), grad, own)
        return grad, None, None, None, None


def rectified_gate(input: torch.Tensor, min_val: float, max_val: float,  # noqa: A002
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """Where a clipped activation passes the gradient backwards: the ReLU-like gate on ``rows``.

    Args:
        input: the activation's input (N, ...).
        min_val: lower clip (0 for ReLU6).
        max_val: upper clip (6 for ReLU6).
        rows: bool (N,): rows that get the rectified gate ``input > min_val``; the others keep the
            activation's own gate ``min_val < input < max_val``. None rectifies every row.

    Returns:
        bool tensor shaped like ``input``.
    """
    above = input > min_val
    if rows is None:
        return above
    if rows.shape != input.shape[:1]:
        raise ValueError(f"rows must have shape ({input.shape[0]},) to match the activation, got {tuple(rows.shape)}")
    own = above & (input < max_val)
    return torch.where(rows.view(-1, *([1] * (input.ndim - 1))), above, own)


@contextlib.contextmanager
def rectified_activations(module: nn.Module, rows: torch.Tensor | None = None) -> Iterator[int]:
    """Within the block, every ``nn.Hardtanh`` (so ``nn.ReLU6``) of ``module`` back-propagates like a ReLU.

    Forward outputs are the module's own (bit-identical); in-place activations are switched to
    out-of-place while the block runs, then restored.

    Args:
        module: the network.
        rows: bool (N,) over the batch, which rows are rectified (None: all).

    Yields:
        how many activation modules were rectified (0 when the network has none: a no-op).
    """
    clipped = [m for m in module.modules() if isinstance(m, nn.Hardtanh)]
    inplace = [m.inplace for m in clipped]

    if rows is not None and bool(rows.all()):
        rows = None  # one fused gate for the whole batch

    def hook(activation: nn.Hardtanh, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not output.requires_grad:
            return output
        if rows is not None and rows.shape != output.shape[:1]:
            raise ValueError(f"rows must have shape ({output.shape[0]},) to match the activation, "
                             f"got {tuple(rows.shape)}")
        return _RectifiedClip.apply(args[0], output, activation.min_val, activation.max_val, rows)

    handles = [m.register_forward_hook(hook) for m in clipped]
    for m in clipped:
        m.inplace = False
    try:
        yield len(clipped)
    finally:
        for handle in handles:
            handle.remove()
        for m, was_inplace in zip(clipped, inplace):
            m.inplace = was_inplace


# --- the batched pass ----------------------------------------------------------------------------


def noise(config: SaliencyConfig, shape: Sequence[int], device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``n - 1`` noise images of ``config``, ``sigma * N(0, 1)`` from a generator seeded with ``seed``.

    Drawn on the CPU in float32 (so CPU and CUDA see the same noise), then moved.

    Args:
        config: a smoothgrad config.
        shape: one image's shape (C, H, W).

    Returns:
        tensor of shape (n - 1, C, H, W).
    """
    generator = torch.Generator().manual_seed(config.seed)
    drawn = torch.randn((config.n - 1, *shape), generator=generator, dtype=torch.float32)
    return (drawn * config.sigma).to(device=device, dtype=dtype)


def average_copies(per_row: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` over each group of rows.

    Args:
        per_row: tensor of shape (N, H, W).
        groups: row indices of shape (G, n), one group per line.

    Returns:
        tensor of shape (G, H, W); a group of one row is that row exactly.
    """
    return per_row[groups].mean(dim=1)


@dataclass(frozen=True)
class PassOne:
    """What :func:`saliency_pass` returns: ``logits`` (B, N) of the clean images, detached, and
    ``saliency`` (B, H, W) (zeros for rows without a config), or None when no row asked for one."""

    logits: torch.Tensor
    saliency: torch.Tensor | None


def saliency_pass(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    configs: Sequence[SaliencyConfig | None],
    *,
    k: int = 5,
    network: nn.Module | None = None,
) -> PassOne:
    """One model call for a batch: the logits of every image and the saliency of those that ask for it.

    The batch fed to ``model`` is the ``B`` clean images followed by the noisy copies of the smoothgrad
    rows; one backward of the summed losses of the saliency rows gives every map. With every config
    ``gradient`` (or None) this is exactly the engine's pass 1 of DESIGN 3.

    Args:
        model: the classifier (an ``nn.Module`` when a config rectifies), normalised images -> logits.
        x: pixel-space images in [0, 1] of shape (B, 3, H, W); not modified.
        normalize: pixel space -> what ``model`` sees.
        configs: one per image; None where no saliency is needed.
        k: top classes in the loss (5).
        network: the module whose activations ``rectify`` hooks, when ``model`` is a wrapper around it
            (e.g. :meth:`elgs.models.LoadedModel.forward`); default: ``model`` itself.

    Returns:
        :class:`PassOne`.
    """
    check_image_batch(x, "x")
    if len(configs) != x.shape[0]:
        raise ValueError(f"configs must have one entry per image ({x.shape[0]}), got {len(configs)}")
    rows = [i for i, config in enumerate(configs) if config is not None]
    if not rows:
        with torch.inference_mode():
            return PassOne(logits=model(normalize(x)), saliency=None)
    batch = x.shape[0]
    # Noisy copies, one block per distinct (n, sigma, seed): the noise is drawn once and shared.
    parts, owners = [x.detach()], []
    next_row = batch
    extra_rows: dict[int, list[int]] = {}
    by_noise: dict[tuple, list[int]] = {}
    for i in rows:
        if configs[i].n > 1:
            by_noise.setdefault((configs[i].n, configs[i].sigma, configs[i].seed), []).append(i)
    for (n, _, _), members in by_noise.items():
        drawn = noise(configs[members[0]], x.shape[1:], x.device, x.dtype)  # (n-1, C, H, W)
        copies = x.detach()[members].unsqueeze(1) + drawn.unsqueeze(0)  # (M, n-1, C, H, W)
        parts.append(copies.flatten(0, 1))
        for m, i in enumerate(members):
            extra_rows[i] = list(range(next_row + m * (n - 1), next_row + (m + 1) * (n - 1)))
            owners.extend([i] * (n - 1))
        next_row += len(members) * (n - 1)
    inputs = torch.cat(parts) if len(parts) > 1 else parts[0]
    owner = torch.tensor(list(range(batch)) + owners, device=x.device)
    rectify = torch.tensor([configs[o] is not None and configs[o].rectify for o in owner.tolist()], device=x.device)
    network = model if network is None else network
    context = rectified_activations(network, rectify) if bool(rectify.any()) else contextlib.nullcontext()
    if bool(rectify.any()) and not isinstance(network, nn.Module):
        raise TypeError("rectify needs the model as an nn.Module (its activation modules are hooked)")
    with torch.enable_grad(), context:
        x_input = inputs.clone().requires_grad_(True)
        logits = model(normalize(x_input))
        classes = logits[:batch].detach().topk(min(k, logits.shape[1]), dim=1).indices  # (B, k)
        loss_rows = rows + [r for i in rows for r in extra_rows.get(i, [])]
        loss_index = torch.tensor(loss_rows, device=x.device)
        loss = classes_loss(logits[loss_index], classes[owner[loss_index]])
        (grad,) = torch.autograd.grad(loss.sum(), x_input)
    per_row = gradient_magnitude(grad)  # (B + E, H, W)
    saliency = torch.zeros((batch, *x.shape[2:]), dtype=per_row.dtype, device=x.device)
    by_n: dict[int, list[int]] = {}
    for i in rows:
        by_n.setdefault(configs[i].n, []).append(i)
    for n, members in by_n.items():
        groups = torch.tensor([[i, *extra_rows.get(i, [])] for i in members], device=x.device)
        saliency[torch.tensor(members, device=x.device)] = average_copies(per_row, groups) if n > 1 else per_row[members]
    return PassOne(logits=logits[:batch].detach(), saliency=saliency.detach())


def estimate_saliency(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    saliency: str | SaliencyConfig = "gradient",
    *,
    k: int = 5,
) -> torch.Tensor:
    """Saliency of each image with one estimator spec; ``"gradient"`` equals :func:`topk_saliency`.

    Args:
        model: classifier in eval mode (an ``nn.Module`` to rectify).
        x: pixel-space images in [0, 1] of shape (B, 3, H, W).
        normalize: pixel space -> what ``model`` sees.
        saliency: a spec such as ``"smoothgrad:n=4,sigma=0.2,rectify=true"`` or a config.
        k: top classes in the loss.

    Returns:
        ``S`` of shape (B, H, W), detached.
    """
    config = parse_saliency(saliency)
    result = saliency_pass(model, x, normalize, [config] * x.shape[0], k=k)
    return result.saliency


# --- WLGS weights --------------------------------------------------------------------------------


def robust_normalize(saliency: torch.Tensor, quantile: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Per-image weights ``clamp((S - min S) / (q(S) - min S), 0, 1)`` with ``q`` a high quantile.

    ``quantile = 1`` is the paper's min-max (``q`` = the max, bit for bit
    :func:`~elgs.defenses.minmax_normalize`). A smoother saliency spreads its mass, so min-max weights
    are small almost everywhere; scaling by, say, the 0.9 quantile gives the top 10% full weight.
    Zeros where ``q == min``.

    Args:
        saliency: tensor of shape (B, 1, H, W) (or (B, C, H, W): statistics over C, H, W).
        quantile: scalar or per-image tensor (B,) in [0.5, 1].

    Returns:
        tensor shaped like ``saliency`` in [0, 1].
    """
    check_image_batch(saliency, "saliency")
    batch = saliency.shape[0]
    q = torch.as_tensor(quantile, dtype=torch.float64).reshape(-1)
    if q.numel() == 1:
        q = q.expand(batch)
    if q.shape != (batch,) or not bool(((q >= QUANTILE_RANGE[0]) & (q <= QUANTILE_RANGE[1])).all()):
        raise ValueError(f"quantile must be a scalar or ({batch},) in [0.5, 1], got {q.tolist()}")
    flat = saliency.flatten(1)
    low = flat.amin(dim=1)
    high = flat.amax(dim=1)
    q = q.to(flat.device, flat.dtype)
    if flat.shape[0] and flat.shape[1] and not bool((q == 1).all()):
        ranked = flat.sort(dim=1).values
        # Linear interpolation between order statistics, as torch.quantile (which caps its input size).
        position = q * (flat.shape[1] - 1)
        below = position.floor().long().clamp(max=flat.shape[1] - 1)
        above = (below + 1).clamp(max=flat.shape[1] - 1)
        fraction = position - below.to(flat.dtype)
        below_value = ranked.gather(1, below[:, None])[:, 0]
        above_value = ranked.gather(1, above[:, None])[:, 0]
        high = torch.where(q == 1, high, below_value + fraction * (above_value - below_value))
    shape = (-1, *([1] * (saliency.ndim - 1)))
    low, span = low.view(shape), (high - low).view(shape)
    # minmax_normalize's own arithmetic, so quantile 1 is the paper's weights bit for bit.
    weights = scale_to_unit(saliency, low, span)
    return torch.where(q.view(shape) == 1, weights, weights.clamp(0.0, 1.0))
