"""Micro benchmark: time of the defence ops against the time of the model passes on the same batch.

Everything is measured in one run, interleaved, and reported as medians and ratios, because a
shared machine's absolute times drift between runs.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from elgs.defenses import DEFENSES, DefenseInput, saliency_from_loss, topk_loss
from elgs.images import image_to_tensor, sample_photo
from elgs.models import LoadedModel, load_model

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry")


def photo_batch(batch_size: int, size: int) -> torch.Tensor:
    """(B, 3, size, size) of scikit-image photographs, cycled."""
    return torch.stack([image_to_tensor(sample_photo(PHOTOS[i % len(PHOTOS)]), size) for i in range(batch_size)])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - started) * 1000


def benchmark_model(model: LoadedModel, x: torch.Tensor, repeats: int) -> dict:
    """Median milliseconds of the passes and of each defence, and each defence's ratio."""
    device = model.device
    x = x.to(device)
    lam = torch.full((x.shape[0],), model.spec.default_lambda, device=device)
    threshold = torch.full((x.shape[0],), 0.2, device=device)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model.module(model.normalize(x))

    def forward_with_saliency() -> torch.Tensor:
        with torch.enable_grad():
            x_input = x.clone().requires_grad_(True)
            return saliency_from_loss(topk_loss(model.module(model.normalize(x_input))), x_input)

    saliency = forward_with_saliency()
    batch = DefenseInput(x=x, mean=model.mean, std=model.std, lam=lam, threshold=threshold, saliency=saliency)
    timings: dict[str, list[float]] = {"forward": [], "forward_backward": []}
    timings.update({name: [] for name in DEFENSES})
    forward(), [d.apply(batch) for d in DEFENSES.values()]  # warm-up
    order = random.Random(0)
    for _ in range(repeats):
        timings["forward"].append(_timed(forward, device))
        timings["forward_backward"].append(_timed(forward_with_saliency, device))
        # A shuffled order per round, so no method always runs first after the model's passes.
        for name in order.sample(list(DEFENSES), len(DEFENSES)):
            timings[name].append(_timed(lambda d=DEFENSES[name]: d.apply(batch), device))
    medians = {name: statistics.median(values) for name, values in timings.items()}
    rows = []
    for name, defense in DEFENSES.items():
        passes = (medians["forward_backward"] if defense.needs_saliency else medians["forward"]) + medians["forward"]
        rows.append({"method": name, "defense_ms": medians[name], "passes_ms": passes,
                     "ratio": medians[name] / passes})
    return {"forward_ms": medians["forward"], "forward_backward_ms": medians["forward_backward"], "methods": rows}


DEFAULT_ESTIMATORS = ("gradient", "gradient:rectify=true", "smoothgrad:n=4,sigma=0.2",
                      "smoothgrad:n=4,sigma=0.2,rectify=true", "smoothgrad:n=8,sigma=0.2,rectify=true")


def benchmark_estimators(model: LoadedModel, x: torch.Tensor, specs: Sequence[str], repeats: int) -> list[dict]:
    """Latency and throughput of a batch of ``/defend/slgs`` requests through the engine, per saliency estimator.

    Rounds are interleaved with the estimator order shuffled per round; medians. ``pass1_ms`` is the
    engine's own pass-1 time (where the estimators differ), ``batch_ms`` the whole ``Engine.run``.
    """
    from elgs.engine import Engine, Request

    engine = Engine(model)
    requests = {spec: [Request(image=image, method="slgs", saliency=spec) for image in x.cpu()] for spec in specs}
    for spec in specs:  # warm-up, and a bad spec fails before any timing
        engine.run(requests[spec])
    pass1: dict[str, list[float]] = {spec: [] for spec in specs}
    total: dict[str, list[float]] = {spec: [] for spec in specs}
    order = random.Random(1)
    for _ in range(repeats):
        for spec in order.sample(list(specs), len(specs)):
            started = time.perf_counter()
            results = engine.run(requests[spec])
            _sync(model.device)
            total[spec].append((time.perf_counter() - started) * 1000)
            pass1[spec].append(results[0].timing_ms["pass1"])
    rows = []
    for spec in specs:
        batch_ms = statistics.median(total[spec])
        rows.append({"saliency": engine.saliency_config(spec).spec, "pass1_ms": statistics.median(pass1[spec]),
                     "batch_ms": batch_ms, "images_per_s": len(x) * 1000 / batch_ms})
    return rows


def run_defense_benchmark(models: Sequence[str], batch_size: int = 4, size: int = 224, repeats: int = 5,
                          device: str | None = None, json_path: str | None = None,
                          estimators: Sequence[str] = DEFAULT_ESTIMATORS) -> list[dict]:
    """Benchmark each ``MODEL`` or ``MODEL:random``; print a table per model and return the results.

    ``estimators``: saliency specs timed end to end as ``/defend/slgs`` batches (empty: skip).
    """
    x = photo_batch(batch_size, size)
    results = []
    for entry in models:
        name, _, weights = entry.partition(":")
        model = load_model(name, weights=weights or "pretrained", device=device, input_size=size)
        result = {"model": name, "weights": model.weights, "device": str(model.device), "batch_size": batch_size,
                  "size": size, "threads": torch.get_num_threads(), **benchmark_model(model, x, repeats)}
        results.append(result)
        print(f"\n{name} ({model.weights} weights) on {model.device}, batch {batch_size} at {size}x{size}, "
              f"{torch.get_num_threads()} threads, median of {repeats}")
        print(f"  forward {result['forward_ms']:.1f} ms, forward+input-gradient {result['forward_backward_ms']:.1f} ms")
        print(f"  {'method':<10} {'defence ms':>11} {'passes ms':>10} {'ratio':>7}")
        for row in result["methods"]:
            print(f"  {row['method']:<10} {row['defense_ms']:>11.2f} {row['passes_ms']:>10.1f} {row['ratio']:>7.4f}")
        if estimators:
            result["estimators"] = benchmark_estimators(model, x, estimators, repeats)
            base = result["estimators"][0]["batch_ms"]
            print(f"  slgs batch of {batch_size} per saliency estimator (Engine.run, pass 1 included):")
            print(f"  {'saliency':<58} {'pass1 ms':>9} {'batch ms':>9} {'img/s':>7} {'x first':>8}")
            for row in result["estimators"]:
                print(f"  {row['saliency']:<58} {row['pass1_ms']:>9.1f} {row['batch_ms']:>9.1f} "
                      f"{row['images_per_s']:>7.2f} {row['batch_ms'] / base:>8.2f}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
    return results
