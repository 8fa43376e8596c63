"""Training through the cascade (``--through auto``): both views the cascade answers from, in one call."""

import torch

from elgs.attacks.through import defend_differentiable, logits_through
from elgs.engine import Engine, Request


def test_through_auto_sums_the_original_and_the_screen_logits(tiny_model, photos):
    images = torch.stack([photos["chelsea"], photos["astronaut"]]).requires_grad_(True)
    logits = logits_through(tiny_model, images, "auto", 3.5)
    with torch.no_grad():
        original = tiny_model.module(tiny_model.normalize(images))
        screened = tiny_model.module(tiny_model.normalize(defend_differentiable(tiny_model, images, "lgs", 3.5)))
    torch.testing.assert_close(logits.detach(), original + screened, rtol=1e-5, atol=1e-5)
    logits[:, 3].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # the patch gets a gradient through both views
    # the screen view is the engine's LGS image
    (served,) = Engine(tiny_model).run([Request(image=photos["astronaut"], method="lgs", lam=3.5)])
    torch.testing.assert_close(defend_differentiable(tiny_model, images[1:].detach(), "lgs", 3.5)[0], served.image,
                               rtol=0, atol=1e-5)
