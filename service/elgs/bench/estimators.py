"""Which saliency estimator and which WLGS weighting defend best: restore rate, clean kept, cost.

    elgs bench estimators DATA PATCH [--lam 3.5] [--limit N] [--out estimators.json]

DATA is a folder as ``elgs attack eval --data`` takes (e.g. ``samples/heldout`` of ``elgs data
samples``); PATCH a patch PNG (its sidecar gives the target) or a training checkpoint ``.pt``. The
patch is pasted at the paper's test placement (top right, 10 px from both edges). For every
estimator spec, pass 1 (:func:`elgs.defenses.saliency_pass`) runs on the clean and on the patched
images; SLGS and WLGS (several weight quantiles) are applied at ``lam``; pass 2 classifies.
Reported per estimator: pass-1 time per image, the saliency mass inside the patch, how much of the
patch the SLGS region covers, and for SLGS and each WLGS weighting the share of fooled images
restored to their label and of clean images kept correct. LGS is the reference row.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from elgs.attacks.patches import apply_patch, patch_mask, top_right_position
from elgs.attacks.train import sidecar_path
from elgs.bench import ESTIMATORS
from elgs.defenses import DefenseInput, get_defense, parse_saliency, saliency_pass, saliency_region
from elgs.images import image_to_tensor, open_image
from elgs.models import LoadedModel

QUANTILES = (1.0, 0.95, 0.9, 0.8)


def load_patch(path: Path) -> tuple[torch.Tensor, int]:
    """(3, s, s) patch and its target class from a PNG with sidecar or a training checkpoint."""
    if path.suffix == ".pt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        patch = torch.sigmoid(checkpoint["parameter"]).float()
        return (patch * 255).round() / 255, int(checkpoint["identity"]["target"])  # as the PNG stores it
    image = open_image(path)
    sidecar = json.loads(sidecar_path(path).read_text())
    return image_to_tensor(image, image.width), int(sidecar["target"])


def classify(model: LoadedModel, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Top-1 (N,) of ``images`` (N, 3, S, S)."""
    with torch.inference_mode():
        return torch.cat([model.module(model.normalize(images[i : i + chunk])).argmax(1)
                          for i in range(0, len(images), chunk)])


def defend(model: LoadedModel, method: str, images: torch.Tensor, saliency: torch.Tensor | None, lam: float,
           quantile: float = 1.0) -> torch.Tensor:
    """``method`` applied to ``images`` (B, 3, S, S) with a precomputed ``saliency`` (B, S, S)."""
    batch = images.shape[0]
    return get_defense(method).apply(DefenseInput(
        x=images, mean=model.mean, std=model.std, lam=torch.full((batch,), lam), threshold=torch.full((batch,), 0.2),
        saliency=saliency, saliency_quantile=torch.full((batch,), quantile),
    )).image


def _patched(images: torch.Tensor, patch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The images with ``patch`` at the test placement, and the (S, S) bool map of where it is."""
    size, patch_size = images.shape[-1], patch.shape[-1]
    top, left = top_right_position(size, patch_size)
    positions = torch.tensor([[top, left]] * len(images))
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top : top + patch_size, left : left + patch_size] = True
    return apply_patch(images, patch, patch_mask("square", patch_size), positions), inside


def estimator_row(model: LoadedModel, spec: str, images: torch.Tensor, patched: torch.Tensor, labels: torch.Tensor,
                  fooled: torch.Tensor, inside: torch.Tensor, lam: float, chunk: int,
                  quantiles: Sequence[float] = QUANTILES) -> dict:
    """One estimator: pass-1 cost, where its saliency sits, and what SLGS and WLGS restore and keep."""
    config = parse_saliency(spec)
    maps = {}
    started = time.perf_counter()
    for name, batch in (("clean", images), ("patched", patched)):
        maps[name] = torch.cat([saliency_pass(model.module, part, model.normalize, [config] * len(part)).saliency
                                for part in batch.split(chunk)])
    per_image_ms = (time.perf_counter() - started) * 1000 / (2 * len(images))
    saliency = maps["patched"][fooled]
    region = saliency_region(saliency)[:, 0].bool()

    def rates(method: str, quantile: float = 1.0) -> dict:
        kept = float((classify(model, defend(model, method, images, maps["clean"], lam, quantile)) == labels)
                     .float().mean())
        restored = classify(model, defend(model, method, patched, maps["patched"], lam, quantile))[fooled]
        return {"clean_kept": kept, "restored": float((restored == labels[fooled]).float().mean())}

    return {"estimator": config.spec, "pass1_ms_per_image": per_image_ms,
            "mass_in_patch": float((saliency * inside).sum() / saliency.sum().clamp_min(1e-30)),
            "patch_covered": float((region & inside).flatten(1).sum(1).float().mean() / inside.sum()),
            "slgs": rates("slgs"), "wlgs": {str(q): rates("wlgs", q) for q in quantiles}}


def run_estimator_benchmark(model: LoadedModel, images: torch.Tensor, labels: torch.Tensor, patch: torch.Tensor,
                            target: int, *, lam: float = 3.5, estimators: Sequence[str] = ESTIMATORS, chunk: int = 8,
                            quantiles: Sequence[float] = QUANTILES, out: Path | None = None) -> dict:
    """Every estimator of ``estimators`` against ``patch``; prints a line each, writes ``out`` as it goes."""
    torch.manual_seed(0)
    patched, inside = _patched(images, patch)
    clean_pred, patched_pred = classify(model, images), classify(model, patched)
    fooled = (patched_pred == target) & (labels != target)
    report = {"images": len(images), "fooled": int(fooled.sum()),
              "clean_correct": float((clean_pred == labels).float().mean()), "lam": lam, "target": target, "rows": []}
    print(f"{len(images)} images, {int(fooled.sum())} fooled, clean top-1 {report['clean_correct']:.2f}")
    kept = float((classify(model, defend(model, "lgs", images, None, lam)) == labels).float().mean())
    restored = float((classify(model, defend(model, "lgs", patched, None, lam))[fooled] == labels[fooled])
                     .float().mean())
    report["rows"].append({"estimator": "(lgs, no saliency)", "clean_kept": kept, "restored": restored})
    print(f"LGS {lam}: restored {restored:.1%}, clean kept {kept:.1%}")
    for spec in estimators:
        row = estimator_row(model, spec, images, patched, labels, fooled, inside, lam, chunk, quantiles)
        report["rows"].append(row)
        wlgs = "  ".join(f"q{q}: {r['restored']:.0%}/{r['clean_kept']:.0%}" for q, r in row["wlgs"].items())
        print(f"{row['estimator']}: pass1 {row['pass1_ms_per_image']:.0f} ms/img, mass {row['mass_in_patch']:.1%}, "
              f"covered {row['patch_covered']:.1%}, SLGS restored {row['slgs']['restored']:.1%} kept "
              f"{row['slgs']['clean_kept']:.1%} | WLGS {wlgs}", flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2))
    return report
