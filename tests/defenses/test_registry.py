"""The torchvision-v2 checks for every registered defence, plus lambda-0 identity and range."""

import pytest
import torch

from elgs.defenses import DEFENSES, DefenseInput, get_defense, local_gradient_map

MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _batch(x, lam=3.5, threshold=0.2, saliency=None):
    b = x.shape[0]
    if saliency is None:
        saliency = torch.rand(b, *x.shape[-2:], generator=torch.Generator().manual_seed(3), dtype=x.dtype).to(x.device)
    return DefenseInput(x=x, mean=MEAN.to(x), std=STD.to(x), lam=torch.full((b,), lam, dtype=x.dtype, device=x.device),
                        threshold=torch.full((b,), threshold, dtype=x.dtype, device=x.device), saliency=saliency)


@pytest.mark.parametrize("name", list(DEFENSES))
def test_batched_equals_unbatched_and_no_inplace(name, dtype, device):
    x = torch.rand(3, 3, 33, 41, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    x[1] *= 0.1  # a dark image next to bright ones: no statistic may cross images
    batch = _batch(x)
    version = x._version
    out = get_defense(name).apply(batch)
    assert x._version == version
    assert out.image.shape == x.shape and out.image.dtype == dtype and out.image.device == x.device
    assert out.mask.shape == (3, 1, 33, 41)
    assert torch.isfinite(out.image).all() and out.image.min() >= 0 and out.image.max() <= 1
    assert out.mask.min() >= 0 and out.mask.max() <= 1
    for i in range(3):
        single = get_defense(name).apply(DefenseInput(
            x=x[i : i + 1], mean=batch.mean, std=batch.std, lam=batch.lam[i : i + 1],
            threshold=batch.threshold[i : i + 1], saliency=batch.saliency[i : i + 1]))
        torch.testing.assert_close(out.image[i : i + 1], single.image, atol=1e-6, rtol=0)
        torch.testing.assert_close(out.mask[i : i + 1], single.mask, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", [n for n, d in DEFENSES.items() if d.uses_lambda] + ["none"])
def test_lambda_zero_is_identity(name, device):
    x = torch.rand(2, 3, 30, 30, device=device)
    out = get_defense(name).apply(_batch(x, lam=0.0))
    assert torch.equal(out.image, x)
    assert torch.equal(out.mask, torch.zeros_like(out.mask))


@pytest.mark.parametrize("name", list(DEFENSES))
def test_empty_batch(name):
    x = torch.rand(0, 3, 16, 16)
    out = get_defense(name).apply(_batch(x, saliency=torch.rand(0, 16, 16)))
    assert out.image.shape == (0, 3, 16, 16) and out.mask.shape == (0, 1, 16, 16)
    assert out.image.dtype == x.dtype and out.mask.dtype == x.dtype


def test_constant_images_stay_finite_and_gradient_defences_leave_them_alone():
    for value in (0.0, 0.5, 1.0):
        x = torch.full((2, 3, 24, 24), value)
        for name in DEFENSES:
            out = get_defense(name).apply(_batch(x, lam=10.0, saliency=torch.zeros(2, 24, 24)))
            assert torch.isfinite(out.image).all(), name
            if get_defense(name).uses_lambda:  # no gradient anywhere: nothing to smooth
                torch.testing.assert_close(out.image, x, atol=1e-6, rtol=0, msg=name)
                assert out.mask.abs().max() == 0, name


def test_lgs_suppresses_towards_mean_colour():
    """With lambda 10 and every block kept, strong-gradient pixels (10 g >= 1) land on the mean colour and
    every other pixel moves towards it by the factor 1 - 10 g."""
    x = torch.linspace(0.1, 0.9, 40).view(1, 1, 1, 40).expand(1, 3, 40, 40).clone()  # a smooth ramp...
    x[..., 10:25, 10:25] = torch.rand(1, 3, 15, 15, generator=torch.Generator().manual_seed(1))  # ...and noise
    mean, std = MEAN.view(1, 3, 1, 1), STD.view(1, 3, 1, 1)
    out = get_defense("lgs").apply(_batch(x, lam=10.0, threshold=0.0)).image
    g = local_gradient_map((x - mean) / std, threshold=0.0)
    strong = 10 * g >= 1
    assert 0.1 < strong.float().mean() < 0.5  # the noise and its surroundings, not the ramp
    distance, before = (out - mean).abs(), (x - mean).abs()
    assert (distance[strong] < 1e-6).all()
    torch.testing.assert_close(distance[~strong], ((1 - 10 * g) * before)[~strong], atol=1e-6, rtol=0)
    assert (distance[~strong] < before[~strong]).float().mean() > 0.99  # towards, not away (ties where g = 0)


def test_baselines_hand_values():
    x = torch.zeros(1, 3, 5, 5)
    x[..., 2, 2] = 1.0
    median = get_defense("median").apply(_batch(x)).image
    assert torch.equal(median, torch.zeros_like(x))  # an isolated pixel is removed
    impulse = torch.zeros(1, 3, 15, 15)
    impulse[..., 7, 7] = 1.0
    gaussian = get_defense("gaussian").apply(_batch(impulse)).image
    assert abs(gaussian.sum().item() - 3.0) < 1e-5  # blur preserves mass away from borders
    # Centre weight of a sigma-1 Gaussian sampled on [-3, 3]^2: (1 / sum_k exp(-k^2 / 2))^2.
    centre = 1 / sum(torch.exp(torch.tensor(-k * k / 2.0)) for k in range(-3, 4)) ** 2
    assert abs(gaussian[0, 0, 7, 7].item() - centre.item()) < 1e-6
    jpeg = get_defense("jpeg").apply(_batch(torch.full((1, 3, 16, 16), 0.5))).image
    assert (jpeg - 0.5).abs().max() <= 2 / 255


def test_registry_describes_ranges():
    described = get_defense("slgs").describe()
    assert described["needs_saliency"] and described["parameters"]["lambda"]["maximum"] == 10.0
    with pytest.raises(KeyError, match="choose one of"):
        get_defense("nope")


def test_median_network_equals_sorting_median():
    from elgs.defenses import median

    x = torch.rand(2, 3, 17, 23, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    expected = padded.unfold(2, 3, 1).unfold(3, 3, 1).flatten(-2).median(dim=-1).values
    assert torch.equal(median(x), expected)
    padded5 = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    assert torch.equal(median(x, kernel_size=5), padded5.unfold(2, 5, 1).unfold(3, 5, 1).flatten(-2).median(dim=-1).values)


def test_slgs_and_wlgs_masks_by_hand():
    from elgs.defenses import local_gradient_map, slgs, slgs_mask, wlgs_mask

    xn = torch.randn(2, 3, 24, 24, dtype=torch.float64)
    saliency = torch.zeros(2, 24, 24, dtype=torch.float64)
    saliency[:, 5:15, 5:15] = 2.0  # region: the square after 2 erosions and 3 dilations, i.e. rows 4..15
    g = local_gradient_map(xn)
    region = torch.zeros(2, 1, 24, 24, dtype=torch.float64)
    region[..., 4:16, 4:16] = 1.0
    torch.testing.assert_close(slgs_mask(xn, saliency), region * g)
    torch.testing.assert_close(wlgs_mask(xn, saliency), (saliency / 2.0).unsqueeze(1) * g)
    torch.testing.assert_close(slgs(xn, saliency, 0.0), xn)
    with pytest.raises(ValueError, match="does not match"):
        slgs_mask(xn, saliency[:, :20])
