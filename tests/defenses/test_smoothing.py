import pytest
import torch

from elgs.defenses import smooth, suppression


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
