import torch

from elgs.defenses import topk_loss, topk_saliency
from tests import reference
from tests.conftest import TinyCNN


def _normalize(x):
    return (x - 0.45) / 0.22


def test_topk_loss_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64))
    # Top 2 classes: 0 and 1 -> -log 0.5 - log 0.25 = 3 log 2
    torch.testing.assert_close(topk_loss(logits, k=2), torch.tensor([3 * torch.log(torch.tensor(2.0)).item()],
                                                                    dtype=torch.float64))


def test_topk_saliency_matches_per_image_reference(device):
    model = TinyCNN(classes=10).double().eval().to(device)
    model.requires_grad_(False)
    x = torch.rand(3, 3, 29, 31, dtype=torch.float64, device=device)
    before = x.clone()
    saliency = topk_saliency(model, x, _normalize)
    assert saliency.shape == (3, 29, 31) and not saliency.requires_grad
    assert torch.equal(x, before)
    for i in range(3):
        torch.testing.assert_close(saliency[i], reference.topk_saliency(model, x[i], _normalize), atol=1e-6, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_saliency_needs_no_weight_gradients():
    model = TinyCNN().eval()  # parameters still require grad here
    saliency = topk_saliency(model, torch.rand(2, 3, 16, 16), _normalize)
    assert saliency.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
