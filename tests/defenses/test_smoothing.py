import math

import pytest
import torch

from elgs.defenses import fill_from_surroundings, fill_with_own_mean, smooth, suppression


def test_smooth_hand_computed():
    xn = torch.tensor([[[[2.0, -1.0], [0.5, 4.0]]]])
    mask = torch.tensor([[[[0.0, 0.1], [0.25, 1.0]]]])
    # factors clamp(1 - 2 m, 0, 1) = [1, 0.8, 0.5, 0]
    expected = torch.tensor([[[[2.0, -0.8], [0.25, 0.0]]]])
    torch.testing.assert_close(smooth(xn, mask, 2.0), expected)


def test_per_sample_lambda_and_broadcast_mask(dtype, device):
    xn = torch.ones(3, 3, 4, 4, dtype=dtype, device=device)
    mask = torch.full((3, 1, 4, 4), 0.25, dtype=dtype, device=device)
    out = smooth(xn, mask, torch.tensor([0.0, 2.0, 10.0]))
    assert out.dtype == dtype and out.device.type == device.type
    torch.testing.assert_close(out[:, 0, 0, 0].cpu(), torch.tensor([1.0, 0.5, 0.0], dtype=dtype))


def test_lambda_zero_is_identity_and_input_untouched():
    xn, mask = torch.randn(2, 3, 5, 5), torch.rand(2, 3, 5, 5)
    versions = xn._version, mask._version
    assert torch.equal(smooth(xn, mask, 0.0), xn)
    assert (xn._version, mask._version) == versions


def test_suppression_clamped():
    s = suppression(torch.tensor([[[[0.0, 0.5, 1.0]]]]), 4.0)
    assert torch.equal(s, torch.tensor([[[[0.0, 1.0, 1.0]]]]))


def test_bad_lambda_shape_named():
    with pytest.raises(ValueError, match=r"lam must be a scalar or have shape \(2,\)"):
        smooth(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4), torch.tensor([1.0, 2.0, 3.0]))


def test_fill_with_own_mean_hand_computed():
    # one channel 2x2: kept pixels 0.2, 0.4, 0.9 -> mean 0.5 replaces the one pixel in the region
    x = torch.tensor([[[[0.2, 0.4], [0.9, 1.0]]]])
    region = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]]])
    torch.testing.assert_close(fill_with_own_mean(x, region), torch.tensor([[[[0.2, 0.4], [0.9, 0.5]]]]))


def test_fill_with_own_mean_per_image_and_channel(dtype, device):
    x = torch.zeros(2, 3, 4, 4, dtype=dtype, device=device)
    x[0, 0], x[0, 1], x[0, 2] = 0.25, 0.5, 0.75
    x[1] = 1.0
    x[:, :, 0, 0] = 0.0  # the suspect pixel, dark in both images
    region = torch.zeros(2, 1, 4, 4, dtype=dtype, device=device)
    region[:, :, 0, 0] = 1.0
    versions = x._version, region._version
    out = fill_with_own_mean(x, region)
    assert out.dtype == dtype and out.device.type == device.type and (x._version, region._version) == versions
    torch.testing.assert_close(out[:, :, 0, 0].cpu(), torch.tensor([[0.25, 0.5, 0.75], [1.0, 1.0, 1.0]], dtype=dtype))
    torch.testing.assert_close(out[:, :, 1:], x[:, :, 1:])


def test_fill_with_own_mean_batched_equals_unbatched():
    x, region = torch.rand(3, 3, 8, 8), (torch.rand(3, 1, 8, 8) > 0.7).float()
    batched = fill_with_own_mean(x, region)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], fill_with_own_mean(x[i:i + 1], region[i:i + 1]))


def test_fill_with_own_mean_edge_regions():
    x = torch.rand(1, 3, 5, 5)
    assert torch.equal(fill_with_own_mean(x, torch.zeros(1, 1, 5, 5)), x)
    everything = fill_with_own_mean(x, torch.ones(1, 1, 5, 5))  # nothing kept: the image's own mean
    torch.testing.assert_close(everything, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    with pytest.raises(ValueError, match=r"region must have shape \(B, 1, H, W\) matching x \(1, 3, 5, 5\), got \(1, 3, 5, 5\)"):
        fill_with_own_mean(x, torch.zeros(1, 3, 5, 5))


def _band(dtype=torch.float32, device="cpu"):
    """One row of 100: columns 0-9 white and 90-99 black are kept, 10-89 are the region (own mean 0.5)."""
    x = torch.zeros(1, 1, 1, 100, dtype=dtype, device=device)
    x[..., :10] = 1.0
    x[..., 10:90] = 0.3  # the suspect's pixels: must not leak into the fill
    region = torch.zeros(1, 1, 1, 100, dtype=dtype, device=device)
    region[..., 10:90] = 1.0
    return x, region


def test_fill_from_surroundings_hand_computed():
    x, region = _band()
    out = fill_from_surroundings(x, region, sigma=0.5)
    # column 10 sees kept white pixels at distance 1 and 2: Gaussian taps e^-2 and e^-8 over Z = 1 + 2e^-2 + 2e^-8;
    # the row has no other kept pixel within the radius (2), so colour = (w + 1e-3 * 0.5) / (w + 1e-3), w = their sum
    w = (math.exp(-2) + math.exp(-8)) / (1 + 2 * math.exp(-2) + 2 * math.exp(-8))
    assert out[0, 0, 0, 10].item() == pytest.approx((w + 1e-3 * 0.5) / (w + 1e-3), rel=1e-5)
    assert out[0, 0, 0, 89].item() == pytest.approx(1e-3 * 0.5 / (w + 1e-3), rel=1e-4)  # black neighbours
    assert out[0, 0, 0, 50].item() == pytest.approx(0.5)  # no kept pixel near: the own mean colour
    torch.testing.assert_close(out[..., :10], x[..., :10], rtol=0, atol=0)
    torch.testing.assert_close(out[..., 90:], x[..., 90:], rtol=0, atol=0)


def test_fill_from_surroundings_blends_rim_into_own_colour(dtype, device):
    x, region = _band(dtype, device)
    versions = x._version, region._version
    out = fill_from_surroundings(x, region, sigma=4.0)
    assert out.dtype == dtype and out.device.type == device.type and (x._version, region._version) == versions
    row = out[0, 0, 0].float().cpu()
    assert row[10] > 0.9 and row[89] < 0.1  # the rim takes its neighbours' colours
    assert abs(row[50].item() - 0.5) < 1e-3  # the middle is the own-colour square
    assert bool((row[10:50].diff() <= 1e-3).all()) and bool((row[50:90].diff() <= 1e-3).all())  # and no new edge


def test_fill_from_surroundings_constant_surroundings_and_edges():
    x = torch.full((2, 3, 9, 9), 0.25)
    x[:, :, 3:6, 3:6] = torch.rand(2, 3, 3, 3)
    region = torch.zeros(2, 1, 9, 9)
    region[:, :, 3:6, 3:6] = 1.0
    torch.testing.assert_close(fill_from_surroundings(x, region, 2.0), torch.full_like(x, 0.25))
    assert torch.equal(fill_from_surroundings(x, torch.zeros_like(region), 2.0), x)
    everything = fill_from_surroundings(x, torch.ones_like(region), 2.0)  # nothing kept: the image's own mean
    torch.testing.assert_close(everything, x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    with pytest.raises(ValueError, match="sigma must be > 0, got 0"):
        fill_from_surroundings(x, region, 0)
    with pytest.raises(ValueError, match=r"region must have shape \(B, 1, H, W\)"):
        fill_from_surroundings(x, torch.zeros(2, 3, 9, 9), 2.0)


def test_fill_from_surroundings_batched_equals_unbatched():
    x, region = torch.rand(3, 3, 16, 16), (torch.rand(3, 1, 16, 16) > 0.7).float()
    batched = fill_from_surroundings(x, region, 3.0)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], fill_from_surroundings(x[i:i + 1], region[i:i + 1], 3.0))
