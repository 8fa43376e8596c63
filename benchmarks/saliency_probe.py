"""Where does the saliency sit on patched images, and why (EfficientNet-Lite0 finding of issue 4)?

Compares the share of the saliency inside a top-right LaVAN patch for the DESIGN 2.3 saliency
(top-5 cross entropy) and three alternatives, then counts ReLU6 units clipped by the patch in
EfficientNet-Lite0's stem. Usage, after the offline pipeline of docs/attacks.md:

    python benchmarks/saliency_probe.py samples/heldout runs/toaster.png
"""
import sys

import torch
import torch.nn.functional as F
from elgs.models import load_model
from elgs.attacks.data import load_image_set, load_tensors
from elgs.attacks.patches import square_mask, fixed_positions, apply_patch
from elgs.images import open_image, image_to_tensor
from elgs.defenses import saliency_region, topk_loss
m = load_model("efficientnet_lite0", device="cpu")
data = load_image_set(sys.argv[1], m)
x, y = load_tensors(data)
x = x[:48]
patch = image_to_tensor(open_image(sys.argv[2]), 64)  # a 64 px LaVAN patch
mask = square_mask(64)
xp = apply_patch(x, patch, mask, fixed_positions(x.shape[0], 224, 64))
inside = torch.zeros(224, 224, dtype=torch.bool); top, left = 10, 224 - 10 - 64
inside[top:top+64, left:left+64] = True
def saliency(loss_fn):
    xi = xp.clone().requires_grad_(True)
    z = m.module(m.normalize(xi))
    (g,) = torch.autograd.grad(loss_fn(z).sum(), xi)
    return g.abs().amax(1)
variants = {
  "top-5 CE (DESIGN 2.3)": lambda z: topk_loss(z, 5),
  "top-1 CE": lambda z: topk_loss(z, 1),
  "top-1 logit": lambda z: z.max(1).values,
  "top-1 minus top-2 logit": lambda z: z.topk(2, 1).values[:, 0] - z.topk(2, 1).values[:, 1],
}
for name, fn in variants.items():
    S = saliency(fn)
    D = saliency_region(S)[:, 0].bool()
    mass = (S[:, inside].sum() / S.sum()).item()
    region_in = (D[:, inside].sum() / D.sum().clamp_min(1)).item()
    cover = (D[:, inside].float().mean()).item()
    print(f"{name:26s} saliency mass in patch {mass:6.1%}  region in patch {region_in:6.1%}  patch covered {cover:6.1%}")

# Is ReLU6 saturation the reason? Stem activations (112x112) inside vs outside the patch.
with torch.no_grad():
    stem = m.module._bn0(m.module._conv_stem(m.normalize(xp)))
    clean_stem = m.module._bn0(m.module._conv_stem(m.normalize(x)))
inside112 = F.interpolate(inside[None, None].float(), size=stem.shape[-2:], mode="nearest")[0, 0].bool()
for label, s in (("patched", stem), ("clean", clean_stem)):
    sat = (s >= 6) | (s <= 0)
    print(f"{label}: stem units clipped by ReLU6 (<=0 or >=6): in patch area {sat[..., inside112].float().mean():.1%}, "
          f"elsewhere {sat[..., ~inside112].float().mean():.1%}; >=6 in patch {(s >= 6)[..., inside112].float().mean():.1%}, elsewhere {(s >= 6)[..., ~inside112].float().mean():.1%}")
xi = xp.clone().requires_grad_(True)
z = m.module(m.normalize(xi))
(g,) = torch.autograd.grad(topk_loss(z, 5).sum(), xi)
gi = (g * (xi - 0.5)).abs().amax(1)
print(f"gradient x input (top-5 CE): mass in patch {(gi[:, inside].sum() / gi.sum()).item():.1%}")
