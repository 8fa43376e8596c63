"""Which saliency estimator and which WLGS weighting defend best: restore rate, clean kept, cost.

    python benchmarks/saliency_estimators.py DATA PATCH [--lam 3.5] [--limit N] [--out estimators.json]

DATA is a folder as ``elgs attack eval --data`` takes (e.g. ``samples/heldout`` of ``elgs data
samples``); PATCH a patch PNG (its sidecar gives the target) or a training checkpoint ``.pt``. The
patch is pasted at the paper's test placement (top right, 10 px from both edges). For every
estimator spec below, pass 1 (:func:`elgs.defenses.saliency_pass`) runs on the clean and on the
patched images; SLGS and WLGS (several weight quantiles) are applied at ``--lam``; pass 2 classifies.
Reported per estimator: pass-1 time per image, the saliency mass inside the patch, how much of the
patch the SLGS region covers, and for SLGS and each WLGS weighting the share of fooled images
restored to their label and of clean images kept correct. LGS is the reference row.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elgs.attacks.data import load_image_set, load_tensors
from elgs.attacks.patches import apply_patch, patch_mask, top_right_position
from elgs.attacks.train import sidecar_path
from elgs.defenses import DefenseInput, get_defense, parse_saliency, saliency_pass, saliency_region
from elgs.images import image_to_tensor, open_image
from elgs.models import load_model

ESTIMATORS = [
    "gradient",
    "gradient:rectify=true",
    "smoothgrad:n=4,sigma=0.2",
    "smoothgrad:n=4,sigma=0.2,rectify=true",
    "smoothgrad:n=4,sigma=0.1,rectify=true",
    "smoothgrad:n=4,sigma=0.3,rectify=true",
    "smoothgrad:n=8,sigma=0.2,rectify=true",
]
QUANTILES = [1.0, 0.95, 0.9, 0.8]


def load_patch(path: Path) -> tuple[torch.Tensor, int]:
    """(3, s, s) patch and its target class from a PNG with sidecar or a training checkpoint."""
    if path.suffix == ".pt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        patch = torch.sigmoid(checkpoint["parameter"]).float()
        return (patch * 255).round() / 255, int(checkpoint["identity"]["target"])  # as the PNG stores it
    image = open_image(path)
    sidecar = json.loads(sidecar_path(path).read_text())
    return image_to_tensor(image, image.width), int(sidecar["target"])


def classify(model, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model.module(model.normalize(images[i : i + chunk])).argmax(1)
                          for i in range(0, len(images), chunk)])


def defend(model, method: str, images: torch.Tensor, saliency: torch.Tensor | None, lam: float,
           quantile: float = 1.0) -> torch.Tensor:
    batch = images.shape[0]
    return get_defense(method).apply(DefenseInput(
        x=images, mean=model.mean, std=model.std, lam=torch.full((batch,), lam), threshold=torch.full((batch,), 0.2),
        saliency=saliency, saliency_quantile=torch.full((batch,), quantile),
    )).image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("patch", type=Path)
    parser.add_argument("--lam", type=float, default=3.5)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--estimators", default=";".join(ESTIMATORS), help="specs separated by ';'")
    parser.add_argument("--out", type=Path, default=Path("estimators.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    model = load_model("efficientnet_lite0", device="cpu")
    images, labels = load_tensors(load_image_set(args.data, model))
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    patch, target = load_patch(args.patch)
    size, patch_size = images.shape[-1], patch.shape[-1]
    top, left = top_right_position(size, patch_size)
    positions = torch.tensor([[top, left]] * len(images))
    patched = apply_patch(images, patch, patch_mask("square", patch_size), positions)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top : top + patch_size, left : left + patch_size] = True

    clean_pred, patched_pred = classify(model, images), classify(model, patched)
    fooled = (patched_pred == target) & (labels != target)
    report = {"images": len(images), "fooled": int(fooled.sum()), "clean_correct": float((clean_pred == labels).float().mean()),
              "lam": args.lam, "target": target, "rows": []}
    print(f"{len(images)} images, {int(fooled.sum())} fooled, clean top-1 {report['clean_correct']:.2f}")

    def rates(defended_clean: torch.Tensor, defended_patched: torch.Tensor) -> dict:
        kept = float((classify(model, defended_clean) == labels).float().mean())
        restored = float((classify(model, defended_patched)[fooled] == labels[fooled]).float().mean())
        return {"clean_kept": kept, "restored": restored}

    lgs = rates(defend(model, "lgs", images, None, args.lam), defend(model, "lgs", patched, None, args.lam))
    report["rows"].append({"estimator": "(lgs, no saliency)", **lgs})
    print(f"LGS {args.lam}: restored {lgs['restored']:.1%}, clean kept {lgs['clean_kept']:.1%}")

    for spec in args.estimators.split(";"):
        config = parse_saliency(spec)
        maps = {}
        started = time.perf_counter()
        for name, batch in (("clean", images), ("patched", patched)):
            maps[name] = torch.cat([saliency_pass(model.module, batch[i : i + args.chunk], model.normalize,
                                                  [config] * len(batch[i : i + args.chunk])).saliency
                                    for i in range(0, len(batch), args.chunk)])
        per_image_ms = (time.perf_counter() - started) * 1000 / (2 * len(images))
        saliency = maps["patched"][fooled]
        mass = float((saliency * inside).sum() / saliency.sum().clamp_min(1e-30))
        region = saliency_region(saliency)[:, 0].bool()
        covered = float((region & inside).flatten(1).sum(1).float().mean() / inside.sum())
        row = {"estimator": config.spec, "pass1_ms_per_image": per_image_ms, "mass_in_patch": mass,
               "patch_covered": covered,
               "slgs": rates(defend(model, "slgs", images, maps["clean"], args.lam),
                             defend(model, "slgs", patched, maps["patched"], args.lam)),
               "wlgs": {str(q): rates(defend(model, "wlgs", images, maps["clean"], args.lam, q),
                                      defend(model, "wlgs", patched, maps["patched"], args.lam, q)) for q in QUANTILES}}
        report["rows"].append(row)
        wlgs = "  ".join(f"q{q}: {r['restored']:.0%}/{r['clean_kept']:.0%}" for q, r in row["wlgs"].items())
        print(f"{config.spec}: pass1 {per_image_ms:.0f} ms/img, mass {mass:.1%}, covered {covered:.1%}, "
              f"SLGS restored {row['slgs']['restored']:.1%} kept {row['slgs']['clean_kept']:.1%} | WLGS {wlgs}",
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
