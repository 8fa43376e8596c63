import math

import numpy as np
import pytest
import torch

from elgs.defenses import block_filter, local_gradient_map, minmax_normalize, sobel_magnitude
from elgs.defenses.gradients import padded_length
from tests import reference


def test_sobel_hand_computed_vertical_edge():
    # Left two columns 0, right three columns 1; 5x5, zero padding.
    image = torch.tensor([[0, 0, 1, 1, 1]] * 5, dtype=torch.float64).reshape(1, 1, 5, 5)
    magnitude = sobel_magnitude(image)[0, 0]
    # Interior rows: Gx = sum over the kernel rows of (left - right) = -(1+2+1) at the edge columns.
    # Border columns see the zero padding; corners see half the kernel rows vertically.
    gx = torch.tensor([
        [0, -3, -3, 0, 3],
        [0, -4, -4, 0, 4],
        [0, -4, -4, 0, 4],
        [0, -4, -4, 0, 4],
        [0, -3, -3, 0, 3],
    ], dtype=torch.float64)
    gy = torch.tensor([
        [0, -1, -3, -4, -3],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 1, 3, 4, 3],
    ], dtype=torch.float64)
    torch.testing.assert_close(magnitude, torch.sqrt(gx**2 + gy**2))


def test_padded_length_formula():
    assert padded_length(15, 15, 10) == 15
    assert padded_length(25, 15, 10) == 25
    assert padded_length(20, 15, 10) == 25
    assert padded_length(224, 15, 10) == 225
    assert padded_length(299, 15, 10) == 305
    assert padded_length(7, 15, 10) == 15


def test_block_filter_hand_computed():
    # 20x20 of ones: stride 10, padded to 25, four blocks. Block means: (0,0) 1, (0,10) and (10,0)
    # 150/225, (10,10) 100/225. With threshold 0.5 the bottom-right block is rejected.
    ones = torch.ones(1, 1, 20, 20, dtype=torch.float64)
    out = block_filter(ones, 0.5)[0, 0]
    assert out[5, 5] == 1.0  # one block, kept
    assert out[5, 12] == 1.0  # two blocks, both kept
    assert out[12, 12] == 0.75  # four blocks, three kept
    assert out[12, 17] == 0.5  # (0,10) kept, (10,10) rejected
    assert out[17, 17] == 0.0  # only (10,10)
    assert block_filter(ones, 0.7)[0, 0, 12, 12] == 0.25


def test_minmax_constant_is_zero_not_nan():
    out = minmax_normalize(torch.full((2, 3, 4, 4), 7.0))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("shape", [(1, 3, 37, 53), (4, 3, 224, 224), (2, 3, 299, 299), (1, 3, 9, 12)])
def test_local_gradient_map_matches_reference(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    xn = torch.randn(shape, generator=generator, dtype=torch.float64)
    # Random noise has near-uniform gradients: a threshold near their mean exercises both branches.
    out = local_gradient_map(xn, threshold=0.3)
    assert out.shape == shape and out.dtype == torch.float64
    for i in range(shape[0]):
        expected = reference.local_gradient_map(xn[i].numpy(), threshold=0.3)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-6, rtol=0)


def test_local_gradient_map_reference_on_photo(photos):
    xn = (torch.stack([photos["chelsea"], photos["coffee"]]).double() - 0.5) / 0.25
    out = local_gradient_map(xn)
    assert out.amax() > 0 and (out == 0).any()  # some blocks kept, some rejected
    for i in range(2):
        np.testing.assert_allclose(out[i].numpy(), reference.local_gradient_map(xn[i].numpy()), atol=1e-6)


def test_constant_image_gives_finite_map():
    xn = torch.full((2, 3, 37, 53), 0.3, dtype=torch.float64)
    out = local_gradient_map(xn)
    assert torch.isfinite(out).all()
    # Zero padding makes the border gradient of a constant image non-zero; the inside is flat.
    expected = reference.local_gradient_map(xn[0].numpy())
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    zero = local_gradient_map(torch.zeros(1, 3, 20, 20, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros_like(zero))


def test_per_sample_threshold_equals_separate_calls():
    xn = torch.randn(3, 3, 40, 40, dtype=torch.float64)
    thresholds = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    batched = local_gradient_map(xn, threshold=thresholds)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], local_gradient_map(xn[i : i + 1], threshold=float(thresholds[i])))


def test_gradient_flows_and_is_finite_on_flat_regions():
    xn = torch.zeros(1, 3, 20, 20, dtype=torch.float64)
    xn[..., 5:10, 5:10] = 1.0
    xn.requires_grad_(True)
    local_gradient_map(xn, threshold=0.0).sum().backward()
    assert torch.isfinite(xn.grad).all() and xn.grad.abs().sum() > 0


def test_gradcheck_sobel():
    xn = torch.rand(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sobel_magnitude, (xn,))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        local_gradient_map(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="overlap"):
        local_gradient_map(torch.rand(1, 3, 8, 8), window=5, overlap=5)
    with pytest.raises(ValueError, match="threshold"):
        local_gradient_map(torch.rand(2, 3, 8, 8), threshold=torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="finite"):
        local_gradient_map(torch.rand(1, 3, 8, 8), threshold=math.nan)
