"""Where does the saliency sit on patched images, and why (EfficientNet-Lite0 finding of issue 4)?

    elgs bench saliency-probe samples/heldout runs/toaster.png [--limit 48]

Compares the share of the saliency inside a top-right LaVAN patch for the DESIGN 2.3 saliency
(top-5 cross entropy) and three alternatives; then, for EfficientNet-Lite0, counts the ReLU6 units
of its stem that the patch clips, and the mass of gradient x input in the patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elgs.attacks.patches import apply_patch, fixed_positions, square_mask, top_right_position
from elgs.defenses import saliency_region, topk_loss
from elgs.models import LoadedModel

VARIANTS = {
    "top-5 CE (DESIGN 2.3)": lambda z: topk_loss(z, 5),
    "top-1 CE": lambda z: topk_loss(z, 1),
    "top-1 logit": lambda z: z.max(1).values,
    "top-1 minus top-2 logit": lambda z: z.topk(2, 1).values[:, 0] - z.topk(2, 1).values[:, 1],
}


def _input_gradient(model: LoadedModel, x: torch.Tensor, loss) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx (B, 3, S, S) of the summed ``loss`` of the logits, and the leaf input it was taken at."""
    with torch.enable_grad():
        leaf = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(model.module(model.normalize(leaf))).sum(), leaf)
    return gradient, leaf.detach()


def _stem_lines(model: LoadedModel, clean: torch.Tensor, patched: torch.Tensor, inside: torch.Tensor) -> list[str]:
    """ReLU6 saturation of EfficientNet-Lite0's stem inside and outside the patch (needs ``_conv_stem``)."""
    module = model.module
    with torch.no_grad():
        stems = {"patched": module._bn0(module._conv_stem(model.normalize(patched))),
                 "clean": module._bn0(module._conv_stem(model.normalize(clean)))}
    small = F.interpolate(inside[None, None].float(), size=stems["clean"].shape[-2:], mode="nearest")[0, 0].bool()
    lines = []
    for label, stem in stems.items():
        clipped, high = (stem >= 6) | (stem <= 0), stem >= 6
        lines.append(f"{label}: stem units clipped by ReLU6 (<=0 or >=6): in patch area "
                     f"{clipped[..., small].float().mean():.1%}, elsewhere {clipped[..., ~small].float().mean():.1%}; "
                     f">=6 in patch {high[..., small].float().mean():.1%}, elsewhere {high[..., ~small].float().mean():.1%}")
    return lines


def run_saliency_probe(model: LoadedModel, images: torch.Tensor, patch: torch.Tensor) -> list[str]:
    """The probe's lines for ``images`` (N, 3, S, S) with ``patch`` (3, P, P) at the test placement; printed."""
    size, patch_size = images.shape[-1], patch.shape[-1]
    patched = apply_patch(images, patch, square_mask(patch_size), fixed_positions(len(images), size, patch_size))
    top, left = top_right_position(size, patch_size)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top : top + patch_size, left : left + patch_size] = True
    lines = []
    for name, loss in VARIANTS.items():
        gradient, _ = _input_gradient(model, patched, loss)
        saliency = gradient.abs().amax(1)
        region = saliency_region(saliency)[:, 0].bool()
        lines.append(f"{name:26s} saliency mass in patch {(saliency[:, inside].sum() / saliency.sum()).item():6.1%}  "
                     f"region in patch {(region[:, inside].sum() / region.sum().clamp_min(1)).item():6.1%}  "
                     f"patch covered {region[:, inside].float().mean().item():6.1%}")
    if hasattr(model.module, "_conv_stem"):  # EfficientNet-Lite0's stem: is ReLU6 saturation the reason?
        lines += _stem_lines(model, images, patched, inside)
    gradient, leaf = _input_gradient(model, patched, VARIANTS["top-5 CE (DESIGN 2.3)"])
    times_input = (gradient * (leaf - 0.5)).abs().amax(1)
    lines.append(f"gradient x input (top-5 CE): mass in patch {(times_input[:, inside].sum() / times_input.sum()).item():.1%}")
    for line in lines:
        print(line)
    return lines
