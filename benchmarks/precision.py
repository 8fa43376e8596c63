"""What the autocast fast path (ELGS_DTYPE) costs in accuracy: top-1 agreement with float32.

    python benchmarks/precision.py [--model efficientnet_lite0] [--dtypes bfloat16,float16] [--device cpu]

For every scikit-image sample photograph, runs ``/defend/slgs`` through the engine in float32 and
with each autocast dtype (the defences stay float32), and counts how often the top-1 class agrees
on the original image (pass 1) and on the defended image (pass 2); also the largest top-1
probability difference and the time per image.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from elgs.engine import Engine, Request
from elgs.images import SAMPLE_PHOTOS, image_to_tensor, sample_photo
from elgs.models import load_model


def run(model_name: str, dtype: str, device: str | None, images: list[torch.Tensor]) -> tuple[list, float]:
    model = load_model(model_name, device=device)
    model.configure_fast_path(dtype=dtype)
    engine = Engine(model)
    engine.run([Request(image=images[0], task="defend", method="slgs")])  # warm-up
    started = time.perf_counter()
    results = [engine.run([Request(image=image, task="defend", method="slgs")])[0] for image in images]
    return results, (time.perf_counter() - started) / len(images) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    photos = [name for name in SAMPLE_PHOTOS]
    size = load_model(args.model, weights="random", device="cpu").input_size
    images = [image_to_tensor(sample_photo(name), size) for name in photos]
    reference, reference_ms = run(args.model, "float32", args.device, images)
    print(f"{args.model}, {len(photos)} photographs, /defend/slgs; float32: {reference_ms:.1f} ms per image")
    for dtype in args.dtypes.split(","):
        try:
            results, ms = run(args.model, dtype, args.device, images)
        except (ValueError, RuntimeError) as error:
            print(f"{dtype}: not available ({error})")
            continue
        original = sum(r.predictions[0].index == f.predictions[0].index for r, f in zip(results, reference))
        defended = sum(r.defended_predictions[0].index == f.defended_predictions[0].index
                       for r, f in zip(results, reference))
        score = max(abs(r.predictions[0].score - f.predictions[0].score) for r, f in zip(results, reference))
        differing = [name for name, r, f in zip(photos, results, reference)
                     if r.predictions[0].index != f.predictions[0].index]
        print(f"{dtype}: top-1 agreement original {original}/{len(photos)}, defended {defended}/{len(photos)}; "
              f"largest top-1 probability difference {score:.4f}; {ms:.1f} ms per image"
              + (f"; original top-1 differs on {', '.join(differing)}" if differing else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
