"""What one training step of `elgs attack train --through` costs, per defence and saliency estimator.

    elgs bench through --data samples/train --batch-size 10 --repeats 3

One LaVAN step (patch pasted, defence, forward, backward, Adam) at the model's input size: without a
defence, through LGS, through SLGS with the paper's gradient and through SLGS with the model's
default estimator (what the service uses). Rounds are interleaved and the medians printed with the
ratio to the plain step, so a shared machine slows every setting alike.
"""

from __future__ import annotations

import statistics
import time

import torch

from elgs.attacks.patches import patch_mask
from elgs.attacks.through import logits_through, resolve_saliency
from elgs.attacks.train import AttackConfig, PatchParameter, attack_loss, initial_patch, patched_batch
from elgs.models import LoadedModel


def _settings(model: LoadedModel) -> list[tuple[str, str | None, str | None]]:
    default = resolve_saliency(model).spec
    return [("no defence", None, None), ("lgs", "lgs", None), ("slgs, gradient", "slgs", "gradient"),
            (f"slgs, {default}", "slgs", default)]


def _step(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, config: AttackConfig, mask: torch.Tensor,
          method: str | None, saliency: str | None, lam: float) -> float:
    """Seconds of one Adam step of a fresh patch through ``method``."""
    parameter = PatchParameter(initial_patch(config), config.parametrization)
    optimizer = torch.optim.Adam([parameter.tensor], lr=0.1)
    started = time.perf_counter()
    patched = patched_batch(images, parameter.patch(), mask, config, torch.Generator().manual_seed(0))
    loss = attack_loss(logits_through(model, patched, method, lam, saliency=saliency), labels, config)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - started


def run_through_cost(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, *, repeats: int = 3,
                     patch_size: int = 64, target: int = 859, lam: float = 3.5) -> dict[str, float]:
    """Median seconds of one step per setting (round 0 warms up, not counted); prints the table."""
    size = images.shape[-1]
    config = AttackConfig(attack="lavan", target=target, patch_size=patch_size, image_size=size, optimizer="adam",
                          seed=0)
    mask = patch_mask("square", patch_size)
    settings = _settings(model)
    times: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    for round_index in range(repeats + 1):
        for name, method, saliency in settings:
            seconds = _step(model, images, labels, config, mask, method, saliency, lam)
            if round_index:
                times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["no defence"]
    print(f"one training step, batch {len(images)} at {size} px, {model.name}, {torch.get_num_threads()} "
          f"threads; median of {repeats} interleaved rounds")
    for name, median in medians.items():
        print(f"{name:<60}{median:8.2f} s {median / base:6.1f}x")
    return medians
