"""Patch masks, placement and batched pasting: hand-computed values, batching, gradients, EoT."""

from __future__ import annotations

import math

import pytest
import torch

from elgs.attacks.patches import (
    apply_patch,
    circle_mask,
    eot_apply_patch,
    fixed_positions,
    patch_mask,
    placement_positions,
    random_positions,
    random_transforms,
    square_mask,
    top_right_position,
    transform_patch,
)


def test_square_mask_is_all_ones():
    assert torch.equal(square_mask(3), torch.ones(1, 3, 3))


def test_circle_mask_by_hand():
    expected4 = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.float32)
    assert torch.equal(circle_mask(4)[0], expected4)
    # Side 5: pixel centres at -2..2 from the centre, radius 2.5; only the corners (2^2 + 2^2 = 8 > 6.25) fall out.
    expected5 = torch.ones(5, 5)
    expected5[0, 0] = expected5[0, 4] = expected5[4, 0] = expected5[4, 4] = 0
    assert torch.equal(circle_mask(5)[0], expected5)


def test_circle_area_approaches_pi_r_squared():
    assert circle_mask(90).sum().item() == pytest.approx(math.pi * 45**2, rel=0.01)


def test_patch_mask_rejects_unknown_shape():
    with pytest.raises(ValueError, match="triangle"):
        patch_mask("triangle", 4)


def test_top_right_position_is_ten_pixels_from_both_edges():
    assert top_right_position(224, 64) == (10, 150)
    assert top_right_position(400, 52) == (10, 338)
    assert fixed_positions(3, 224, 64).tolist() == [[10, 150]] * 3
    with pytest.raises(ValueError, match="does not fit"):
        top_right_position(64, 60)


def test_apply_patch_square_by_hand():
    images = torch.zeros(1, 1, 5, 5)
    patch = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    out = apply_patch(images, patch, square_mask(2), torch.tensor([[1, 2]]))
    expected = torch.tensor([[0, 0, 0, 0, 0],
                             [0, 0, 1, 2, 0],
                             [0, 0, 3, 4, 0],
                             [0, 0, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_apply_patch_circle_keeps_corners_of_image():
    images = torch.full((1, 1, 6, 6), 0.5)
    out = apply_patch(images, torch.ones(1, 4, 4), circle_mask(4), torch.tensor([[1, 1]]))
    expected = torch.full((6, 6), 0.5)
    expected[1:5, 1:5] = circle_mask(4)[0] * 1.0 + (1 - circle_mask(4)[0]) * 0.5
    assert torch.equal(out[0, 0], expected)


def test_apply_patch_overhang_is_clipped():
    images = torch.zeros(1, 1, 4, 4)
    patch = torch.arange(1.0, 10.0).view(1, 3, 3)
    out = apply_patch(images, patch, square_mask(3), torch.tensor([[-1, 2]]))
    expected = torch.zeros(4, 4)
    expected[0:2, 2:4] = torch.tensor([[4.0, 5.0], [7.0, 8.0]])
    assert torch.equal(out[0, 0], expected)


def test_apply_patch_batch_equals_one_by_one_and_leaves_input_alone(photos):
    images = torch.stack(list(photos.values())[:4])
    version = images._version
    patch = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    positions = random_positions(4, 32, 8, generator=torch.Generator().manual_seed(1))
    batched = apply_patch(images, patch, circle_mask(8), positions)
    single = torch.cat([apply_patch(images[i : i + 1], patch, circle_mask(8), positions[i : i + 1]) for i in range(4)])
    assert torch.equal(batched, single)
    assert images._version == version
    for i, (top, left) in enumerate(positions.tolist()):
        inside = circle_mask(8)[0] > 0
        assert torch.equal(batched[i, :, top : top + 8, left : left + 8][:, inside], patch[:, inside])


def test_apply_patch_gradient_counts_covered_pixels():
    images = torch.rand(3, 3, 16, 16, dtype=torch.float64)
    patch = torch.rand(3, 4, 4, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0, 0], [12, 12], [14, 5]])  # the last overhangs by two rows
    apply_patch(images, patch, square_mask(4, dtype=torch.float64), positions).sum().backward()
    expected = torch.full((3, 4, 4), 2.0, dtype=torch.float64)
    expected[:, :2, :] += 1
    assert torch.equal(patch.grad, expected)


def test_apply_patch_gradcheck():
    images = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    patch = torch.rand(3, 3, 3, dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[1, 2], [3, 0]])
    assert torch.autograd.gradcheck(lambda p: apply_patch(images, p, circle_mask(3, dtype=torch.float64), positions),
                                    (patch,))


def test_apply_patch_on_device(device, dtype):
    images = torch.zeros(2, 3, 24, 24, device=device, dtype=dtype)
    out = apply_patch(images, torch.ones(3, 4, 4, device=device, dtype=dtype), square_mask(4, device=device),
                      fixed_positions(2, 24, 4, device=device))
    assert out.device.type == device.type and out.dtype == dtype
    assert out[:, :, 10:14, 10:14].sum().item() == out.sum().item() == 2 * 3 * 16


def test_placement_positions_dispatch_and_reject_unknown_names():
    assert torch.equal(placement_positions("fixed", 2, 224, 64), fixed_positions(2, 224, 64))
    seeded = placement_positions("random", 4, 32, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seeded, random_positions(4, 32, 8, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="'corner'"):
        placement_positions("corner", 1, 32, 8)


def test_random_positions_stay_inside():
    positions = random_positions(500, 32, 10, generator=torch.Generator().manual_seed(0))
    assert positions.min() >= 0 and positions.max() <= 22
    assert positions.max() == 22 and positions.min() == 0  # both ends reachable


def test_eot_identity_transform_equals_mask_replacement():
    images = torch.rand(2, 3, 20, 20)
    patch = torch.rand(3, 4, 4)
    # No rotation, scale 1, centre (5, 12): the patch covers rows 3..6 and columns 10..13 exactly.
    transforms = torch.tensor([[0.0, 1.0, 5.0, 12.0]] * 2, dtype=torch.float64)
    eot = eot_apply_patch(images, patch, square_mask(4), transforms)
    pasted = apply_patch(images, patch, square_mask(4), torch.tensor([[3, 10]] * 2))
    assert torch.allclose(eot, pasted, atol=1e-6)


def test_eot_quarter_turn_rotates_the_patch():
    patch = torch.rand(1, 4, 4)
    transforms = torch.tensor([[math.pi / 2, 1.0, 10.0, 10.0]], dtype=torch.float64)
    canvas, mask = transform_patch(patch, square_mask(4), transforms, 20, 20)
    # y points down, so a positive angle turns the patch clockwise on screen.
    assert torch.allclose(canvas[0, 0, 8:12, 8:12], torch.rot90(patch[0], k=-1), atol=1e-5)
    assert mask.sum().item() == pytest.approx(16.0, abs=1e-4)


def test_eot_scale_doubles_the_side():
    transforms = torch.tensor([[0.0, 2.0, 10.0, 10.0]], dtype=torch.float64)
    _, mask = transform_patch(torch.ones(3, 4, 4), square_mask(4), transforms, 20, 20)
    assert mask.sum().item() == pytest.approx(64.0, abs=1e-3)


def test_random_transforms_keep_the_patch_inside_and_are_differentiable():
    transforms = random_transforms(16, image_size=64, patch_size=16, scale_range=(0.8, 1.2), max_rotation_deg=45,
                                   generator=torch.Generator().manual_seed(0))
    assert transforms[:, 0].abs().max() <= math.radians(45)
    assert ((transforms[:, 1] >= 0.8) & (transforms[:, 1] <= 1.2)).all()
    patch = torch.rand(3, 16, 16, requires_grad=True)
    images = torch.zeros(16, 3, 64, 64)
    out = eot_apply_patch(images, patch, circle_mask(16), transforms)
    _, mask = transform_patch(patch.detach(), circle_mask(16), transforms, 64, 64)
    # Nothing of the disc is cut off by the image border: its area scales with scale^2.
    assert torch.allclose(mask.sum(dim=(1, 2, 3)), circle_mask(16).sum() * transforms[:, 1].float() ** 2, rtol=0.05)
    out.sum().backward()
    assert patch.grad.abs().sum() > 0
