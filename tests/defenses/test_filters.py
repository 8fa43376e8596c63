"""The separable Gaussian blur of elgs.defenses.filters, on both of its paths."""

import pytest
import torch


@pytest.mark.parametrize("sigma", [1.0, 4.0])  # the sliced path (radius 3) and the depthwise conv2d path (radius 12)
def test_gaussian_impulse_response_is_the_outer_kernel(sigma, dtype, device):
    from elgs.defenses.filters import gaussian, gaussian_kernel1d

    x = torch.zeros(2, 3, 41, 41, dtype=dtype, device=device)
    x[:, :, 20, 20] = 1.0
    out = gaussian(x, sigma)
    kernel = gaussian_kernel1d(sigma, dtype, device)
    radius = kernel.numel() // 2
    expected = torch.zeros_like(x)
    expected[:, :, 20 - radius : 21 + radius, 20 - radius : 21 + radius] = torch.outer(kernel, kernel)
    assert out.dtype == dtype and out.device.type == device.type
    torch.testing.assert_close(out, expected)
    constant = torch.full((1, 2, 9, 9), 0.3, dtype=dtype, device=device)  # replicated borders keep a constant
    torch.testing.assert_close(gaussian(constant, sigma), constant)
