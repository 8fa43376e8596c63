import numpy as np
import pytest
import torch

from elgs.defenses import dilate, erode, saliency_region
from tests import reference


def test_region_hand_computed_square():
    # 5x5 salient square in a 9x9 map: 2 erosions leave the centre pixel, 3 dilations grow it to 7x7.
    saliency = torch.zeros(1, 9, 9)
    saliency[0, 2:7, 2:7] = 1.0
    expected = torch.zeros(1, 1, 9, 9)
    expected[0, 0, 1:8, 1:8] = 1.0
    assert torch.equal(saliency_region(saliency), expected)


def test_outside_pixels_are_ignored():
    # A constant map is all "salient"; erosion must not eat the border (OpenCV's default border).
    region = saliency_region(torch.ones(2, 1, 6, 8))
    assert torch.equal(region, torch.ones(2, 1, 6, 8))
    corner = torch.zeros(1, 1, 4, 4)
    corner[..., 0, 0] = 1
    assert dilate(corner)[0, 0].sum() == 4 and erode(corner).sum() == 0


@pytest.mark.parametrize("shape", [(3, 37, 53), (2, 1, 20, 31)])
def test_region_matches_reference(shape, device):
    saliency = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    region = saliency_region(saliency.to(device)).cpu()
    assert region.shape == (shape[0], 1, shape[-2], shape[-1]) and region.dtype == torch.float64
    for i in range(shape[0]):
        np.testing.assert_array_equal(region[i, 0].numpy(), reference.saliency_region(saliency[i].reshape(shape[-2:]).numpy()))


def test_region_is_per_image():
    maps = torch.rand(4, 16, 16)
    maps[2] *= 100  # a large map in the batch must not move the others' mean
    batched = saliency_region(maps)
    for i in range(4):
        assert torch.equal(batched[i], saliency_region(maps[i : i + 1])[0])


def test_region_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        saliency_region(torch.rand(2, 3, 8, 8))
