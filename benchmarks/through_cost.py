"""What one training step of `elgs attack train --through` costs, per defence and saliency estimator.

    python benchmarks/through_cost.py --data samples/train --batch-size 10 --repeats 3

One LaVAN step (patch pasted, defence, forward, backward, Adam) on EfficientNet-Lite0 at 224 px:
without a defence, through LGS, through SLGS with the paper's gradient and through SLGS with the
model's default estimator (what the service uses). Rounds are interleaved and the medians printed
with the ratio to the plain step, so a shared machine slows every setting alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from elgs.attacks.data import load_image_set, load_tensors
from elgs.attacks.patches import patch_mask
from elgs.attacks.through import logits_through, resolve_saliency
from elgs.attacks.train import AttackConfig, PatchParameter, attack_loss, initial_patch, patched_batch
from elgs.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model("efficientnet_lite0", device="cpu")
    images, labels = load_tensors(load_image_set(args.data, model))
    images, labels = images[: args.batch_size], labels[: args.batch_size]
    default = resolve_saliency(model).spec
    settings = [("no defence", None, None), ("lgs", "lgs", None), ("slgs, gradient", "slgs", "gradient"),
                (f"slgs, {default}", "slgs", default)]
    config = AttackConfig(attack="lavan", target=859, patch_size=64, image_size=224, optimizer="adam", seed=0)
    mask = patch_mask("square", 64)
    times: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, method, saliency in settings:
            parameter = PatchParameter(initial_patch(config), config.parametrization)
            optimizer = torch.optim.Adam([parameter.tensor], lr=0.1)
            started = time.perf_counter()
            patched = patched_batch(images, parameter.patch(), mask, config, torch.Generator().manual_seed(0))
            loss = attack_loss(logits_through(model, patched, method, 3.5, saliency=saliency), labels, config)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if round_index:
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["no defence"])
    print(f"one training step, batch {args.batch_size} at 224 px, EfficientNet-Lite0, {torch.get_num_threads()} "
          f"threads; median of {args.repeats} interleaved rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<60}{median:8.2f} s {median / base:6.1f}x")


if __name__ == "__main__":
    main()
