"""Training universal targeted patches: LaVAN squares and Adversarial-Patch circles (design.md, section 7).

The patch is a single (3, s, s) image shared by all images. ``lavan`` maximises ``z_target - z_source``
with the patch pasted by mask replacement at the test placement or at random positions; ``patch``
minimises ``CE(z, target)`` under Expectation over Transformation (random rotation, scale and
position). ``through`` puts a defence inside the loss (paper Eq. 13, see :mod:`elgs.attacks.through`).

Parametrisations: ``clamp`` optimises pixel values directly and clamps them to [0, 1] after every
step (the paper's setting, used with SGD at lr 1); ``sigmoid`` optimises ``w`` with patch
``sigmoid(w)``, which never leaves [0, 1] and suits Adam (lr about 0.1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from elgs.attacks.losses import lavan_loss, target_cross_entropy, targeted_success
from elgs.attacks.patches import (
    apply_patch,
    eot_apply_patch,
    patch_mask,
    placement_positions,
    random_transforms,
    top_right_position,
)
from elgs.attacks.schedule import paper_scheduler
from elgs.attacks.through import THROUGH_METHODS, logits_through, resolve_saliency
from elgs.defenses import DEFAULT_THRESHOLD, LAMBDA_RANGE, THRESHOLD_RANGE, get_defense, parse_saliency
from elgs.images import encode_png, image_to_tensor, open_image
from elgs.models import LoadedModel

Attack = Literal["lavan", "patch"]
SHAPES = {"lavan": "square", "patch": "circle"}
DEFAULT_LR = {"sgd": 1.0, "adam": 0.1}


@dataclass
class AttackConfig:
    """Everything that defines a training run (stored in the checkpoint and the JSON sidecar).

    Attributes:
        attack: ``lavan`` (square, logit margin) or ``patch`` (circle, EoT, cross entropy).
        target: target class index.
        patch_size: patch side in pixels.
        image_size: side of the (square) images the patch is trained on.
        placement: ``fixed`` (the test placement, top-right 10 px in) or ``random``.
        epochs: epochs of ``batches_per_epoch`` batches of ``batch_size`` images.
        batches_per_epoch: batches per epoch (the paper: 50).
        batch_size: images per batch (the paper: 20).
        optimizer: ``sgd`` (momentum, the paper's schedule) or ``adam`` (constant lr).
        lr: learning rate; None takes 1.0 for SGD and 0.1 for Adam.
        momentum: SGD momentum.
        parametrization: ``clamp`` or ``sigmoid`` (module docstring); None: clamp for SGD, sigmoid for Adam.
        through: defence inside the loss (``lgs``, ``slgs``, ``wlgs``) or None.
        through_lambda: that defence's lambda.
        through_saliency: saliency estimator spec of ``through`` SLGS/WLGS; None: the model's default, as
            the service (:func:`train_patch` records the resolved spec here).
        threshold: that defence's block threshold.
        scale_range: EoT scale range (``patch`` only).
        max_rotation_deg: EoT rotation range, plus or minus (``patch`` only).
        seed: seeds the initial patch, image order, positions and transforms.
    """

    attack: Attack = "lavan"
    target: int = 859
    patch_size: int = 52
    image_size: int = 224
    placement: Literal["fixed", "random"] = "fixed"
    epochs: int = 200
    batches_per_epoch: int = 50
    batch_size: int = 20
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float | None = None
    momentum: float = 0.9
    parametrization: Literal["clamp", "sigmoid"] | None = None
    through: str | None = None
    through_lambda: float = 3.5
    through_saliency: str | None = None
    threshold: float = DEFAULT_THRESHOLD
    scale_range: tuple[float, float] = (0.8, 1.2)
    max_rotation_deg: float = 45.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in SHAPES:
            raise ValueError(f"attack must be 'lavan' or 'patch', got {self.attack!r}")
        if self.placement not in ("fixed", "random"):
            raise ValueError(f"placement must be 'fixed' or 'random', got {self.placement!r}")
        if self.optimizer not in DEFAULT_LR:
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.through is not None and self.through not in THROUGH_METHODS:
            raise ValueError(f"through must be one of {', '.join(THROUGH_METHODS)}, got {self.through!r}")
        if self.through_saliency is not None:
            parse_saliency(self.through_saliency)  # raises ValueError naming the bad part
        for name in ("epochs", "batches_per_epoch", "batch_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, (low, high) in (("through_lambda", LAMBDA_RANGE), ("threshold", THRESHOLD_RANGE)):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):  # NaN fails the range test too
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value}")
        top_right_position(self.image_size, self.patch_size)  # raises when the patch does not fit
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.parametrization is None:
            self.parametrization = "clamp" if self.optimizer == "sgd" else "sigmoid"
        if self.parametrization not in ("clamp", "sigmoid"):
            raise ValueError(f"parametrization must be 'clamp' or 'sigmoid', got {self.parametrization!r}")
        self.scale_range = tuple(self.scale_range)

    @property
    def shape(self) -> str:
        return SHAPES[self.attack]

    def identity(self) -> dict:
        """Every field: all of them affect training, so all must match for a checkpoint to be resumed."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


@dataclass
class TrainResult:
    """A finished (or resumed-and-finished) run.

    Attributes:
        patch: (3, s, s) in [0, 1], quantised to 8 bits as saved.
        config: the run's configuration.
        epoch_loss: mean loss per epoch.
        epoch_success: targeted success per epoch on the training batches (running, patch changing).
        final_success_rate: success of the final patch on the training images, at the training placement.
        seconds: wall time of this process's share of training.
    """

    patch: torch.Tensor
    config: AttackConfig
    epoch_loss: list[float] = field(default_factory=list)
    epoch_success: list[float] = field(default_factory=list)
    final_success_rate: float = float("nan")
    seconds: float = 0.0


def initial_patch(config: AttackConfig, init: str | Path | None = None) -> torch.Tensor:
    """Uniform random noise (seeded), or the image ``init`` resized to the patch (the paper's
    image-initialised patch); (3, s, s) in [0, 1]."""
    if init is not None:
        return image_to_tensor(open_image(init), config.patch_size)
    generator = torch.Generator().manual_seed(config.seed)
    return torch.rand(3, config.patch_size, config.patch_size, generator=generator)


class PatchParameter:
    """The optimised tensor and its map to a patch in [0, 1] (``clamp`` or ``sigmoid``)."""

    def __init__(self, patch: torch.Tensor, parametrization: str) -> None:
        self.parametrization = parametrization
        value = torch.logit(patch, eps=1e-3) if parametrization == "sigmoid" else patch.clone()
        self.tensor = value.detach().clone().requires_grad_(True)

    def patch(self) -> torch.Tensor:
        return torch.sigmoid(self.tensor) if self.parametrization == "sigmoid" else self.tensor

    @torch.no_grad()
    def project(self) -> None:
        if self.parametrization == "clamp":
            self.tensor.clamp_(0.0, 1.0)


def quantize(patch: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit values a PNG stores, so reported numbers match the saved patch."""
    return (patch.detach().clamp(0, 1) * 255).round() / 255


def patched_batch(images: torch.Tensor, patch: torch.Tensor, mask: torch.Tensor, config: AttackConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """Paste ``patch`` into ``images`` (B, 3, S, S) as the attack does during training."""
    batch, size = images.shape[0], images.shape[-1]
    if config.attack == "patch":
        transforms = random_transforms(batch, image_size=size, patch_size=config.patch_size,
                                       scale_range=config.scale_range, max_rotation_deg=config.max_rotation_deg,
                                       generator=generator)
        if config.placement == "fixed":
            top, left = top_right_position(size, config.patch_size)
            transforms[:, 2] = top + config.patch_size / 2
            transforms[:, 3] = left + config.patch_size / 2
        return eot_apply_patch(images, patch, mask, transforms)
    positions = placement_positions(config.placement, batch, size, config.patch_size, generator=generator)
    return apply_patch(images, patch, mask, positions)


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, config: AttackConfig) -> torch.Tensor:
    """The attack's scalar loss; images whose true class is the target are left out."""
    weight = (labels != config.target).to(logits.dtype)
    if config.attack == "lavan":
        return lavan_loss(logits, config.target, labels, weight)
    return target_cross_entropy(logits, config.target, weight)


def _epoch_order(size: int, count: int, seed: int, epoch: int) -> torch.Tensor:
    """``count`` image indices for one epoch: fresh permutations of the set, reproducible per epoch."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    repeats = math.ceil(count / size)
    return torch.cat([torch.randperm(size, generator=generator) for _ in range(repeats)])[:count]


class _Batches:
    """Draws batches from an in-memory tensor set or an on-disk dataset."""

    def __init__(self, data: Dataset | tuple[torch.Tensor, torch.Tensor], workers: int) -> None:
        self.data = data
        self.workers = workers

    def __len__(self) -> int:
        return len(self.data[0]) if isinstance(self.data, tuple) else len(self.data)

    def epoch(self, indices: torch.Tensor, batch_size: int):
        if isinstance(self.data, tuple):
            images, labels = self.data
            for chunk in indices.split(batch_size):
                yield images[chunk], labels[chunk]
            return
        subset = torch.utils.data.Subset(self.data, indices.tolist())
        yield from torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                               num_workers=self.workers)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically so an interrupted save never leaves a broken checkpoint."""
    partial = path.with_suffix(path.suffix + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, partial)
    partial.replace(path)


def train_patch(
    model: LoadedModel,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    config: AttackConfig,
    *,
    init: str | Path | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    workers: int = 0,
    final_eval_images: int = 1000,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> TrainResult:
    """Train a universal targeted patch.

    Args:
        model: the frozen classifier (eval mode).
        data: ``(images (N, 3, S, S), labels (N,))`` in memory, or a dataset of ``(image, label)``.
        config: the run (see :class:`AttackConfig`).
        init: optional image to initialise the patch from.
        checkpoint: file written at the end of every epoch.
        resume: continue from ``checkpoint`` when it exists (its configuration must match).
        progress: show a tqdm bar with loss and success rate.
        workers: DataLoader workers for an on-disk dataset.
        final_eval_images: how many training images measure the final success rate.
        on_epoch: called with ``(epoch, mean_loss, success)`` after every epoch.

    Returns:
        a :class:`TrainResult`.
    """
    started = time.perf_counter()
    if config.through is not None and get_defense(config.through).needs_saliency:
        config = dataclasses.replace(config, through_saliency=resolve_saliency(model, config.through_saliency).spec)
    batches = _Batches(data, workers)
    if len(batches) == 0:
        raise ValueError("no training images")
    state = _TrainingState.start(config, initial_patch(config, init).to(model.device))
    result = TrainResult(patch=torch.empty(0), config=config)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.is_file():
        start_epoch = state.resume(checkpoint, model.device, result)
    bar = tqdm(total=config.epochs * config.batches_per_epoch, initial=start_epoch * config.batches_per_epoch,
               disable=not progress, desc=f"{config.attack} -> {config.target}", unit="batch", dynamic_ncols=True)
    mask = patch_mask(config.shape, config.patch_size, device=model.device)
    for epoch in range(start_epoch, config.epochs):
        loss, success = _train_epoch(model, batches, state, mask, epoch, bar)
        result.epoch_loss.append(loss)
        result.epoch_success.append(success)
        if checkpoint is not None:
            save_checkpoint(checkpoint, state.checkpoint(epoch + 1, result))
        if on_epoch is not None:
            on_epoch(epoch, loss, success)
    bar.close()
    result.patch = quantize(state.parameter.patch()).cpu()
    result.final_success_rate = success_rate(model, batches, result.patch, config, final_eval_images)
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class _TrainingState:
    """What a checkpoint holds: the run's configuration, the patch parameter, its optimiser and schedule."""

    config: AttackConfig
    parameter: PatchParameter
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None

    @classmethod
    def start(cls, config: AttackConfig, patch: torch.Tensor) -> _TrainingState:
        parameter = PatchParameter(patch, config.parametrization)
        if config.optimizer == "sgd":
            optimizer = torch.optim.SGD([parameter.tensor], lr=config.lr, momentum=config.momentum)
            return cls(config, parameter, optimizer, paper_scheduler(optimizer, config.epochs))
        return cls(config, parameter, torch.optim.Adam([parameter.tensor], lr=config.lr), None)

    def resume(self, checkpoint: Path, device: torch.device, result: TrainResult) -> int:
        """Load ``checkpoint`` (its configuration must match) and the loss curves into ``result``; the
        epoch to continue from."""
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["identity"] != self.config.identity():
            changed = {k: (state["identity"].get(k), v) for k, v in self.config.identity().items()
                       if state["identity"].get(k) != v}
            raise ValueError(f"checkpoint {checkpoint} was written for another run (saved vs now: {changed})")
        with torch.no_grad():
            self.parameter.tensor.copy_(state["parameter"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        result.epoch_loss, result.epoch_success = list(state["epoch_loss"]), list(state["epoch_success"])
        return int(state["epoch"])

    def checkpoint(self, epoch: int, result: TrainResult) -> dict:
        """The checkpoint after ``epoch`` epochs."""
        return {"identity": self.config.identity(), "parameter": self.parameter.tensor.detach(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict() if self.scheduler else {},
                "epoch": epoch, "epoch_loss": result.epoch_loss, "epoch_success": result.epoch_success}


def _train_epoch(model: LoadedModel, batches: _Batches, state: _TrainingState, mask: torch.Tensor, epoch: int,
                 bar) -> tuple[float, float]:
    """One epoch of optimiser steps; its mean loss and running targeted success."""
    config, parameter, optimizer = state.config, state.parameter, state.optimizer
    generator = torch.Generator().manual_seed(config.seed * 7_919 + epoch)
    order = _epoch_order(len(batches), config.batches_per_epoch * config.batch_size, config.seed, epoch)
    losses, hits, counted = [], 0, 0
    for images, labels in batches.epoch(order, config.batch_size):
        images, labels = images.to(model.device), labels.to(model.device)
        patched = patched_batch(images, parameter.patch(), mask, config, generator)
        logits = logits_through(model, patched, config.through, config.through_lambda, config.threshold,
                                config.through_saliency)
        loss = attack_loss(logits, labels, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        parameter.project()
        eligible = labels != config.target
        hits += int((targeted_success(logits.detach(), config.target) & eligible).sum())
        counted += int(eligible.sum())
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", success=f"{hits / max(counted, 1):.0%}",
                        lr=f"{optimizer.param_groups[0]['lr']:g}")
    if state.scheduler is not None:
        state.scheduler.step()
    return sum(losses) / len(losses), hits / max(counted, 1)


@torch.no_grad()
def success_rate(model: LoadedModel, batches: _Batches, patch: torch.Tensor, config: AttackConfig,
                 max_images: int = 1000) -> float:
    """Targeted success of ``patch`` on up to ``max_images`` training images (true class != target),
    pasted as in training (same seed for random placements), through ``config.through`` if set."""
    device = model.device
    patch = patch.to(device)
    mask = patch_mask(config.shape, config.patch_size, device=device)
    generator = torch.Generator().manual_seed(config.seed + 1)
    order = torch.arange(min(len(batches), max_images))
    if len(order) == 0:
        return float("nan")
    hits = counted = 0
    # Through SLGS/WLGS the saliency multiplies the batch (smoothgrad: n copies, each with a backward):
    # keep the training batch size there, or the final check needs several times the training's memory.
    through_saliency = config.through is not None and get_defense(config.through).needs_saliency
    for images, labels in batches.epoch(order, config.batch_size if through_saliency else max(config.batch_size, 32)):
        images, labels = images.to(device), labels.to(device)
        # (SLGS/WLGS saliency switches gradients back on internally, for the input only.)
        logits = logits_through(model, patched_batch(images, patch, mask, config, generator), config.through,
                                config.through_lambda, config.threshold, config.through_saliency).detach()
        eligible = labels != config.target
        hits += int((targeted_success(logits, config.target) & eligible).sum())
        counted += int(eligible.sum())
    return hits / counted if counted else float("nan")


def sidecar_path(patch_path: str | Path) -> Path:
    """``patch.png`` -> ``patch.json``."""
    return Path(patch_path).with_suffix(".json")


def save_patch(result: TrainResult, out: str | Path, model: LoadedModel, extra: dict | None = None) -> Path:
    """Write the patch PNG and its JSON sidecar (attack, model, target, size, epochs, success, loss curve)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(result.patch))
    config = result.config
    sidecar = {
        "attack": config.attack,
        "shape": config.shape,
        "model": model.name,
        "weights": model.weights,
        "target": config.target,
        "target_label": model.labels[config.target] if config.target < len(model.labels) else str(config.target),
        "patch_size": config.patch_size,
        "image_size": config.image_size,
        "placement": config.placement,
        "epochs": config.epochs,
        "through": config.through,
        "through_saliency": config.through_saliency,
        "final_success_rate": None if math.isnan(result.final_success_rate) else result.final_success_rate,
        "epoch_loss": result.epoch_loss,
        "epoch_success": result.epoch_success,
        "train_seconds": round(result.seconds, 1),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        **(extra or {}),
    }
    path = sidecar_path(out)
    path.write_text(json.dumps(sidecar, indent=2))
    return path
