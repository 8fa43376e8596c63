"""What the autocast fast path (ELGS_DTYPE) costs in accuracy: top-1 agreement with float32.

    elgs bench precision [--model efficientnet_lite0] [--dtypes bfloat16,float16] [--device cpu]

For every scikit-image sample photograph, runs ``/defend/slgs`` through the engine in float32 and
with each autocast dtype (the defences stay float32), and counts how often the top-1 class agrees
on the original image (pass 1) and on the defended image (pass 2); also the largest top-1
probability difference and the time per image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from elgs.engine import Engine, Request
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
from elgs.models import get_model_spec, load_model


def run(model_name: str, dtype: str, device: str | None, images: list[torch.Tensor], weights: str = "pretrained",
        input_size: int | None = None) -> tuple[list, float]:
    """``/defend/slgs`` results of every image through the engine with autocast ``dtype``, and ms per image."""
    torch.manual_seed(0)  # random weights: the same network for every dtype
    model = load_model(model_name, device=device, weights=weights, input_size=input_size)
    model.configure_fast_path(dtype=dtype)
    engine = Engine(model)
    engine.run([Request(image=images[0], task="defend", method="slgs")])  # warm-up
    started = time.perf_counter()
    results = [engine.run([Request(image=image, task="defend", method="slgs")])[0] for image in images]
    return results, (time.perf_counter() - started) / len(images) * 1000


def run_precision(model: str = "efficientnet_lite0", dtypes: Sequence[str] = ("bfloat16", "float16"),
                  device: str | None = None, weights: str = "pretrained", input_size: int | None = None,
                  photos: Sequence[str] = SAMPLE_PHOTOS) -> list[dict]:
    """Top-1 agreement of each autocast dtype with float32 on ``photos``; prints a line per dtype."""
    size = input_size or get_model_spec(model).input_size
    images = [image_to_tensor(sample_photo(name), size) for name in photos]
    reference, reference_ms = run(model, "float32", device, images, weights, input_size)
    print(f"{model}, {len(photos)} photographs, /defend/slgs; float32: {reference_ms:.1f} ms per image")
    rows = []
    for dtype in dtypes:
        try:
            results, ms = run(model, dtype, device, images, weights, input_size)
        except (ValueError, RuntimeError) as error:
            print(f"{dtype}: not available ({error})")
            continue
        original = sum(r.predictions[0].index == f.predictions[0].index for r, f in zip(results, reference))
        defended = sum(r.defended_predictions[0].index == f.defended_predictions[0].index
                       for r, f in zip(results, reference))
        score = max(abs(r.predictions[0].score - f.predictions[0].score) for r, f in zip(results, reference))
        differing = [name for name, r, f in zip(photos, results, reference)
                     if r.predictions[0].index != f.predictions[0].index]
        rows.append({"dtype": dtype, "original_agreement": original, "defended_agreement": defended,
                     "max_probability_difference": score, "ms_per_image": ms, "differing": differing})
        print(f"{dtype}: top-1 agreement original {original}/{len(photos)}, defended {defended}/{len(photos)}; "
              f"largest top-1 probability difference {score:.4f}; {ms:.1f} ms per image"
              + (f"; original top-1 differs on {', '.join(differing)}" if differing else ""))
    return rows
