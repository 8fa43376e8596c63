"""The idea of LGS on a controlled case: a noisy square pasted on a smooth photo."""

import torch

from elgs.defenses import DefenseInput, get_defense, local_gradient_map
from elgs.defenses.filters import gaussian
from elgs.images import image_to_tensor, sample_photo

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def test_gradient_map_finds_and_lgs_suppresses_noise_square():
    smooth_photo = gaussian(image_to_tensor(sample_photo("coffee"), 224).unsqueeze(0), sigma=3.0)
    attacked = smooth_photo.clone()
    noise = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    top, left = 10, 224 - 10 - 40
    attacked[..., top : top + 40, left : left + 40] = noise
    inside = torch.zeros(224, 224, dtype=torch.bool)
    inside[top : top + 40, left : left + 40] = True

    xn = (attacked - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)
    g = local_gradient_map(xn)[0].sum(dim=0)
    assert g[inside].sum() / g.sum() > 0.6  # the square is 3% of the image

    batch = DefenseInput(x=attacked, mean=MEAN, std=STD, lam=torch.tensor([3.5]), threshold=torch.tensor([0.2]))
    defended = get_defense("lgs").apply(batch).image
    energy_before = (attacked - MEAN.view(1, 3, 1, 1))[..., inside].abs().mean()
    energy_after = (defended - MEAN.view(1, 3, 1, 1))[..., inside].abs().mean()
    assert energy_after < 0.5 * energy_before
    # Outside the square the smooth photo is left almost as it was.
    assert (defended - attacked)[..., ~inside].abs().mean() < 0.01
