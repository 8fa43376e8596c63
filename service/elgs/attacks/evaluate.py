"""Evaluate defences against trained patches: the paper's Table 1 and Fig. 5, through the engine.

For every method (and every lambda of the methods that take one) the clean images and the patched
images go through :class:`elgs.engine.Engine` in batches of ``task="defend"`` requests, exactly as the
service would run them. Reported per row: top-1 accuracy on clean images, and per patch the top-1
accuracy on patched images, the targeted success rate (over images whose true class is not the
target), the share of successfully attacked images whose label the defence restored, the mean SSIM
between input and defended image (scikit-image, as the paper) and images per second. For SLGS, how
much of the saliency region lies inside the patch (and how much of the patch it covers).

The attack score of every answer (the L1 distance between the softmax vectors of pass 1 and pass 2)
is evaluated as a detector: its AUROC clean vs attacked images and, the sharper question, correctly
classified clean images vs images the patch fooled; the share of clean and of attacked images it
flags at the model's calibrated threshold; and the top-1 accuracy of ``final_predictions`` (the
defended answer when flagged, else the original), the one answer a caller would use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from elgs.attacks.metrics import auroc
from elgs.attacks.patches import composite, patch_mask, place, placement_positions, top_right_position
from elgs.attacks.train import sidecar_path
from elgs.defenses import DEFAULT_THRESHOLD, get_defense, saliency_region
from elgs.engine import Engine, Request
from elgs.images import image_to_tensor, open_image
from elgs.models import LoadedModel


@dataclass
class PatchSpec:
    """A patch to evaluate: its pixels, shape and target (from its JSON sidecar when there is one).

    Attributes:
        path: the PNG.
        patch: (3, s, s) in [0, 1].
        shape: ``square`` or ``circle``.
        target: class index (or a class name still to resolve; None: unknown).
        model: the model it was trained on, if known.
        image_size: the image side it was trained for, if known.
        name: column name in tables.
    """

    path: Path
    patch: torch.Tensor
    shape: str
    target: int | str | None
    model: str | None = None
    image_size: int | None = None
    name: str = ""

    @classmethod
    def load(cls, path: str | Path, *, shape: str | None = None, target: str | int | None = None) -> PatchSpec:
        """Read ``path`` and, when present, its sidecar ``path.json``; explicit arguments win."""
        path = Path(path)
        image = open_image(path)
        if image.width != image.height:
            raise ValueError(f"{path}: a patch must be square, got {image.width}x{image.height}")
        sidecar_file = sidecar_path(path)
        sidecar = json.loads(sidecar_file.read_text()) if sidecar_file.is_file() else {}
        resolved_shape = shape or sidecar.get("shape") or "square"
        resolved_target = target if target is not None else sidecar.get("target")
        if isinstance(resolved_target, str) and resolved_target.strip().isdigit():
            resolved_target = int(resolved_target)
        return cls(path=path, patch=image_to_tensor(image, image.width), shape=resolved_shape,
                   target=resolved_target, model=sidecar.get("model"), image_size=sidecar.get("image_size"),
                   name=f"{path.stem} ({image.width}px)")


def settings(methods: list[str], lambdas: list[float]) -> list[tuple[str, float | None]]:
    """``(method, lambda)`` rows: one per lambda for methods that take one, else one row."""
    rows = []
    for method in methods:
        if get_defense(method).uses_lambda:
            rows += [(method, lam) for lam in lambdas]
        else:
            rows.append((method, None))
    return rows


def mean_ssim(inputs: torch.Tensor, defended: torch.Tensor) -> float:
    """Mean SSIM over a batch (B, 3, H, W) in [0, 1] (scikit-image, ``data_range=1``, per channel)."""
    a = inputs.permute(0, 2, 3, 1).double().cpu().numpy()
    b = defended.permute(0, 2, 3, 1).double().cpu().numpy()
    # structural_similarity takes one image at a time (no batched form), hence the loop over images.
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)]))


def saliency_overlap(saliency: torch.Tensor, patch_masks: torch.Tensor) -> dict[str, float]:
    """Where the SLGS saliency region falls relative to the patch, averaged over images.

    Args:
        saliency: ``S`` (B, H, W).
        patch_masks: (B, 1, H, W) 0/1 patch canvases.

    Returns:
        ``region_in_patch`` (share of region pixels inside the patch), ``patch_in_region`` (share of the
        patch covered by the region), ``saliency_mass_in_patch`` (share of sum(S) inside the patch),
        ``patch_area`` (share of the image the patch covers: the chance level of the first).
    """
    region = saliency_region(saliency)  # (B, 1, H, W)
    inside = patch_masks > 0.5
    dims = (1, 2, 3)
    region_pixels = region.sum(dim=dims).clamp(min=1)
    return {
        "region_in_patch": float(((region * inside).sum(dim=dims) / region_pixels).mean()),
        "patch_in_region": float(((region * inside).sum(dim=dims) / inside.sum(dim=dims).clamp(min=1)).mean()),
        "saliency_mass_in_patch": float(((saliency.unsqueeze(1) * inside).sum(dim=dims)
                                         / saliency.sum(dim=(1, 2)).clamp(min=1e-30)).mean()),
        "patch_area": float(inside.float().mean()),
    }


PER_IMAGE_KEYS = ("score", "original", "defended")


def run_engine(engine: Engine, images: torch.Tensor, method: str, lam: float | None, threshold: float,
               batch_size: int, saliency: str | None = None, attack_threshold: float | None = None) -> dict:
    """Defend ``images`` (N, 3, S, S) through the engine in batches of ``task="defend"`` requests.

    Returns:
        ``original`` top-1 (N,) from pass 1, ``defended`` top-1 (N,), ``final`` top-1 (N,) of
        ``final_predictions``, ``score`` (N,) attack scores, ``attacked`` (N,) bool or None when the
        model has no threshold, ``images`` (N, 3, S, S) defended, ``saliency`` (N, S, S) or None,
        ``saliency_method`` (the canonical spec, or None), ``attack_threshold`` and ``seconds`` of wall time.
    """
    original, top1, final, score, attacked, defended, maps = [], [], [], [], [], [], []
    first = None
    started = time.perf_counter()
    for chunk in images.split(batch_size):
        results = engine.run([Request(image=image, task="defend", method=method, lam=lam, threshold=threshold,
                                      saliency=saliency, attack_threshold=attack_threshold) for image in chunk])
        first = first or results[0]
        original += [r.predictions[0].index for r in results]
        top1 += [r.defended_predictions[0].index for r in results]
        final += [r.final_predictions[0].index for r in results]
        score += [r.attack_score for r in results]
        attacked += [r.attacked for r in results]
        defended.append(torch.stack([r.image for r in results]))
        if results[0].saliency is not None:
            maps.append(torch.stack([r.saliency for r in results]))
    decided = bool(attacked) and all(flag is not None for flag in attacked)
    return {"original": torch.tensor(original), "defended": torch.tensor(top1), "final": torch.tensor(final),
            "score": torch.tensor(score, dtype=torch.float64),
            "attacked": torch.tensor(attacked, dtype=torch.bool) if decided else None,
            "images": torch.cat(defended), "saliency": torch.cat(maps) if maps else None,
            "saliency_method": first.saliency_method if first is not None else None,
            "attack_threshold": first.attack_threshold if first is not None else None,
            "seconds": time.perf_counter() - started}


def _image_chunks(data: Dataset | tuple[torch.Tensor, torch.Tensor], chunk: int, limit: int | None, workers: int):
    """``(images, labels)`` chunks of at most ``chunk`` images, streamed so large sets never sit in memory."""
    if isinstance(data, tuple):
        images, labels = data
        count = len(images) if limit is None else min(limit, len(images))
        for start in range(0, count, chunk):
            yield images[start : min(start + chunk, count)], labels[start : min(start + chunk, count)]
        return
    if limit is not None:
        data = torch.utils.data.Subset(data, range(min(limit, len(data))))
    yield from torch.utils.data.DataLoader(data, batch_size=chunk, shuffle=False, num_workers=workers)


def evaluate(
    model: LoadedModel,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    patches: list[PatchSpec],
    *,
    methods: list[str],
    lambdas: list[float],
    placement: str = "fixed",
    batch_size: int = 16,
    limit: int | None = None,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    saliency: str | None = None,
    attack_threshold: float | None = None,
    progress: bool = True,
    chunk: int = 256,
    workers: int = 0,
) -> dict:
    """Table 1 numbers for ``patches`` against ``methods`` x ``lambdas`` (see the module docstring).

    Images are streamed in chunks of ``chunk``; every chunk runs through every setting, and the counts
    are summed, so memory does not grow with the data set.

    Args:
        model: the classifier (the patches' model).
        data: a dataset of ``(image, label)`` or ``(images (N, 3, S, S), labels (N,))``.
        patches: patches to evaluate (targets resolved to indices).
        methods: defence names.
        lambdas: lambdas for the methods that take one.
        placement: ``fixed`` (top-right, 10 px in) or ``random`` (seeded, the same for every method).
        batch_size: requests per engine batch.
        limit: evaluate the first ``limit`` images only.
        seed: seeds random placements.
        threshold: gradient-map block threshold.
        saliency: saliency estimator spec for SLGS and WLGS (None: the model's default).
        attack_threshold: attack-score threshold for every row (None: the model's calibrated ones).
        progress: show a progress bar.
        chunk: images decoded at a time.
        workers: data loader workers for an on-disk dataset.

    Returns:
        a JSON-ready report (see :func:`write_report`).
    """
    if placement not in ("fixed", "random"):
        raise ValueError(f"placement must be 'fixed' or 'random', got {placement!r}")
    size = model.input_size
    for spec in patches:
        if not isinstance(spec.target, int):
            raise ValueError(f"{spec.path}: target must be resolved to a class index, got {spec.target!r}")
        patch_size = spec.patch.shape[-1]
        if placement == "fixed":
            top_right_position(size, patch_size)  # raises when the patch does not fit
        elif patch_size > size:
            raise ValueError(f"{spec.path}: a {patch_size} px patch does not fit a {size} px image")
    if batch_size < 1 or chunk < 1:
        raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size} and {chunk}")
    total = len(data[0]) if isinstance(data, tuple) else len(data)
    total = total if limit is None else min(limit, total)
    if total <= 0:
        raise ValueError("no images to evaluate")
    engine = Engine(model)
    table = settings(methods, lambdas)
    if not table:
        raise ValueError(f"nothing to evaluate: methods {methods} with lambdas {lambdas} give no setting")
    for method, lam in table:  # bad names and out-of-range values fail here, before any work
        engine.resolve(Request(image=torch.zeros(3, size, size), task="defend", method=method, lam=lam,
                               threshold=threshold, saliency=saliency, attack_threshold=attack_threshold))
    # Per setting: sums over images; per setting and patch: sums over images. The attack score and the
    # pass-1 and pass-2 top-1 are kept per image (the detector's figures need them, see detector_summary).
    sums = [{"clean_correct": 0.0, "ssim_clean": 0.0, "seconds": 0.0, "processed": 0, "saliency_method": None,
             "attack_threshold": None, "per_image": {key: [] for key in PER_IMAGE_KEYS},
             "attacks": [{"correct": 0.0, "eligible": 0.0, "hits": 0.0, "fooled": 0.0, "restored": 0.0,
                          "ssim": 0.0, "saliency": {}, "per_image": {key: [] for key in PER_IMAGE_KEYS}}
                         for _ in patches]} for _ in table]
    all_labels = []
    generators = [torch.Generator().manual_seed(seed * 1_000 + index) for index in range(len(patches))]
    bar = tqdm(total=len(table) * (1 + len(patches)) * total, disable=not progress, unit="img", desc="eval",
               dynamic_ncols=True)
    seen = 0
    for images, labels in _image_chunks(data, chunk, limit, workers):
        labels = torch.as_tensor(labels)
        if images.shape[-2:] != (size, size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes {size}x{size}")
        seen += len(images)
        all_labels += labels.tolist()
        patched_sets, masks = [], []
        for spec, generator in zip(patches, generators):
            patch_size = spec.patch.shape[-1]
            positions = placement_positions(placement, len(images), size, patch_size, generator=generator)
            patch_canvas, mask_canvas = place(spec.patch.to(images.dtype), patch_mask(spec.shape, patch_size),
                                              positions, size, size)
            patched_sets.append(composite(images, patch_canvas, mask_canvas))
            masks.append(mask_canvas)
        for (method, lam), acc in zip(table, sums):
            bar.set_postfix(method=method if lam is None else f"{method} {lam:g}")
            clean = run_engine(engine, images, method, lam, threshold, batch_size, saliency, attack_threshold)
            bar.update(len(images))
            acc["clean_correct"] += float((clean["defended"] == labels).sum())
            acc["saliency_method"], acc["attack_threshold"] = clean["saliency_method"], clean["attack_threshold"]
            for key in PER_IMAGE_KEYS:
                acc["per_image"][key] += clean[key].tolist()
            acc["ssim_clean"] += mean_ssim(images, clean["images"]) * len(images)
            acc["seconds"] += clean["seconds"]
            acc["processed"] += len(images)
            for spec, patched, mask, attack in zip(patches, patched_sets, masks, acc["attacks"]):
                run = run_engine(engine, patched, method, lam, threshold, batch_size, saliency, attack_threshold)
                bar.update(len(images))
                acc["seconds"] += run["seconds"]
                acc["processed"] += len(images)
                eligible = labels != spec.target
                fooled = (run["original"] == spec.target) & eligible  # the attack worked before the defence
                attack["correct"] += float((run["defended"] == labels).sum())
                attack["eligible"] += float(eligible.sum())
                attack["hits"] += float(((run["defended"] == spec.target) & eligible).sum())
                attack["fooled"] += float(fooled.sum())
                attack["restored"] += float((run["defended"][fooled] == labels[fooled]).sum())
                attack["ssim"] += mean_ssim(patched, run["images"]) * len(images)
                for key in PER_IMAGE_KEYS:
                    attack["per_image"][key] += run[key].tolist()
                if run["saliency"] is not None:
                    for key, value in saliency_overlap(run["saliency"], mask).items():
                        attack["saliency"][key] = attack["saliency"].get(key, 0.0) + value * len(images)
    bar.close()

    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator else None

    rows = []
    for (method, lam), acc in zip(table, sums):
        row = {"method": method, "lambda": lam, "saliency_method": acc["saliency_method"],
               "clean_accuracy": acc["clean_correct"] / seen, "ssim_clean": acc["ssim_clean"] / seen,
               "attacks": {}, "images_per_second": ratio(acc["processed"], acc["seconds"]),
               "per_image": acc["per_image"]}
        for spec, attack in zip(patches, acc["attacks"]):
            row["attacks"][spec.name] = {
                "accuracy": attack["correct"] / seen,
                "success_rate": ratio(attack["hits"], attack["eligible"]),
                "undefended_success_rate": ratio(attack["fooled"], attack["eligible"]),
                "restored_rate": ratio(attack["restored"], attack["fooled"]),
                "ssim": attack["ssim"] / seen,
                **({"saliency": {k: v / seen for k, v in attack["saliency"].items()}} if attack["saliency"] else {}),
                "per_image": attack["per_image"],
            }
        detector_summary(row, all_labels, {spec.name: spec.target for spec in patches}, acc["attack_threshold"])
        rows.append(row)
    return {
        "model": model.name, "weights": model.weights, "input_size": model.input_size, "images": seen,
        "placement": placement, "threshold": threshold, "saliency": saliency, "labels": all_labels,
        "patches": [{"name": p.name, "path": str(p.path), "shape": p.shape, "size": int(p.patch.shape[-1]),
                     "target": p.target, "target_label": model.labels[p.target]} for p in patches],
        "rows": rows,
    }


def detector_summary(row: dict, labels: list[int], targets: dict[str, int], attack_threshold: float | None) -> dict:
    """Fill ``row`` (and its ``attacks``) with the attack score's figures at ``attack_threshold``.

    The decision is the engine's: ``attacked = score > threshold`` (None without a threshold), and
    ``final_predictions`` is the original answer when not attacked, else the defended one. Computed from
    the row's ``per_image`` scores and top-1s, so a report can be re-decided at other thresholds
    (:func:`rethreshold`) without running the model again.

    Args:
        row: a report row with ``per_image`` (clean) and per patch ``per_image``: ``score``,
            ``original`` and ``defended`` top-1, one entry per image.
        labels: true class per image.
        targets: patch name -> target class.
        attack_threshold: the threshold (None: nothing is decided).

    Returns:
        ``row``, updated in place.
    """
    labels_t = torch.tensor(labels)

    def decided(per_image: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        score = torch.tensor(per_image["score"], dtype=torch.float64)
        flags = None if attack_threshold is None else score > attack_threshold
        original, defended = torch.tensor(per_image["original"]), torch.tensor(per_image["defended"])
        final = defended if flags is None else torch.where(flags, defended, original)
        return score, flags, final

    def share(values: torch.Tensor | None) -> float | None:
        return None if values is None or len(values) == 0 else float(values.double().mean())

    clean_score, clean_flags, clean_final = decided(row["per_image"])
    clean_correct = torch.tensor(row["per_image"]["original"]) == labels_t
    row.update(attack_threshold=attack_threshold, clean_flagged=share(clean_flags),
               clean_final_accuracy=share(clean_final == labels_t),
               clean_attack_score_mean=float(clean_score.mean()))
    for name, attack in row["attacks"].items():
        score, flags, final = decided(attack["per_image"])
        original = torch.tensor(attack["per_image"]["original"])
        fooled = (original == targets[name]) & (labels_t != targets[name])  # the attack worked before the defence
        attack.update(
            auroc=auroc(clean_score, score),
            auroc_fooled=auroc(clean_score[clean_correct], score[fooled])
            if fooled.any() and clean_correct.any() else None,
            detection_rate=share(flags),
            detection_rate_fooled=share(flags[fooled]) if flags is not None and fooled.any() else None,
            final_accuracy=share(final == labels_t),
            final_restored_rate=share((final == labels_t)[fooled]) if fooled.any() else None,
            attack_score_mean=float(score.mean()),
        )
    return row


def rethreshold(report: dict, thresholds) -> dict:
    """A copy of ``report`` with every row re-decided at the thresholds of ``thresholds``
    (:class:`elgs.thresholds.AttackThresholds`, e.g. a calibration file written after the evaluation ran)."""
    report = json.loads(json.dumps(report))
    targets = {patch["name"]: patch["target"] for patch in report["patches"]}
    for row in report["rows"]:
        threshold = thresholds.lookup(row["method"], row["lambda"], row["saliency_method"])
        detector_summary(row, report["labels"], targets, threshold)
    return report


def _cell(fraction: float | None, width: int) -> str:
    """A right-aligned percentage, or '-' where there was nothing to count."""
    return f"{'-':>{width}}" if fraction is None else f"{100 * fraction:>{width - 1}.1f}%"


def format_table(report: dict) -> str:
    """The paper's Table 1 layout: one row per method and lambda; top-1 accuracy (%) clean and per patch,
    then success rate, restored share, SSIM and throughput."""
    names = [p["name"] for p in report["patches"]]
    header = f"{'method':<14}{'clean':>8}" + "".join(f"{name[:22]:>24}" for name in names)
    header += "".join(f"{'success':>9}{'restored':>10}" for _ in names) + f"{'SSIM':>8}{'img/s':>8}"
    lines = [f"{report['model']} ({report['weights']}), {report['images']} images at {report['input_size']}px, "
             f"patch placement {report['placement']}; top-1 accuracy %", header, "-" * len(header)]
    for row in report["rows"]:
        label = row["method"].upper() if row["method"] != "none" else "no defence"
        if row["lambda"] is not None:
            label += f" {row['lambda']:g}"
        line = f"{label:<14}{100 * row['clean_accuracy']:>8.2f}"
        line += "".join(f"{100 * row['attacks'][n]['accuracy']:>24.2f}" for n in names)
        for name in names:
            attack = row["attacks"][name]
            line += _cell(attack["success_rate"], 9) + _cell(attack["restored_rate"], 10)
        line += f"{row['ssim_clean']:>8.3f}{row['images_per_second'] or 0:>8.1f}"
        lines.append(line)
    slgs_rows = [row for row in report["rows"] if row["method"] == "slgs"]
    for name in names if slgs_rows else []:
        overlap = slgs_rows[0]["attacks"][name]["saliency"]
        lines.append(f"SLGS saliency region vs {name}: {100 * overlap['region_in_patch']:.1f}% of the region lies "
                     f"in the patch (the patch is {100 * overlap['patch_area']:.1f}% of the image) and covers "
                     f"{100 * overlap['patch_in_region']:.1f}% of the patch; "
                     f"{100 * overlap['saliency_mass_in_patch']:.1f}% of the saliency mass is in the patch")
    lines.append("success: defended top-1 is the target (true class != target); restored: share of the images "
                 "the patch fooled whose true label the defence brought back")
    lines += ["", *format_detector_table(report)]
    return "\n".join(lines)


def _number(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_detector_table(report: dict) -> list[str]:
    """Per patch: the attack score as a detector and the accuracy of ``final_predictions``, per row."""
    lines = []
    for patch in report["patches"]:
        name = patch["name"]
        header = (f"{'method':<14}{'threshold':>10}{'AUROC':>7}{'AUROC fooled':>13}{'flags clean':>12}"
                  f"{'flags attacked':>15}{'flags fooled':>13}{'final clean':>12}{'final attacked':>15}"
                  f"{'final restored':>15}")
        lines += [f"attack score vs {name} (L1 distance of the softmax before and after the defence) and "
                  f"final_predictions (defended answer when flagged, else the original); top-1 %", header,
                  "-" * len(header)]
        for row in report["rows"]:
            label = row["method"].upper() if row["method"] != "none" else "no defence"
            if row["lambda"] is not None:
                label += f" {row['lambda']:g}"
            attack = row["attacks"][name]
            lines.append(f"{label:<14}{_number(row['attack_threshold'], 10)}{_number(attack['auroc'], 7)}"
                         f"{_number(attack['auroc_fooled'], 13)}{_cell(row['clean_flagged'], 12)}"
                         f"{_cell(attack['detection_rate'], 15)}{_cell(attack['detection_rate_fooled'], 13)}"
                         f"{_cell(row['clean_final_accuracy'], 12)}{_cell(attack['final_accuracy'], 15)}"
                         f"{_cell(attack['final_restored_rate'], 15)}")
    methods = sorted({row["saliency_method"] for row in report["rows"] if row["saliency_method"]})
    lines.append("AUROC: clean vs attacked images; AUROC fooled: correctly classified clean images vs the images "
                 "the patch fooled; flags: share above the model's calibrated threshold ('-': none calibrated)"
                 + (f"; saliency for SLGS/WLGS: {', '.join(methods)}" if methods else ""))
    return lines


def write_report(report: dict, path: str | Path) -> None:
    """Write ``report`` as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def plot_accuracy(report: dict, path: str | Path) -> None:
    """Accuracy vs lambda per method, clean (dashed) and attacked (solid), as the paper's Fig. 5; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    names = [p["name"] for p in report["patches"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(row["method"] for row in report["rows"]))
    for index, method in enumerate(methods):
        rows = [row for row in report["rows"] if row["method"] == method]
        colour = colours[index % len(colours)]
        label = "no defence" if method == "none" else method.upper()
        if rows[0]["lambda"] is None:  # does not depend on lambda: a line across the whole axis
            axes.axhline(100 * rows[0]["clean_accuracy"], color=colour, linestyle="--")
            for name in names:
                axes.axhline(100 * rows[0]["attacks"][name]["accuracy"], color=colour,
                             label=f"{label} ({name})" if len(names) > 1 else label)
            continue
        xs = [row["lambda"] for row in rows]
        axes.plot(xs, [100 * row["clean_accuracy"] for row in rows], "--o", color=colour, markersize=3)
        for name in names:
            axes.plot(xs, [100 * row["attacks"][name]["accuracy"] for row in rows], "-o", color=colour, markersize=3,
                      label=f"{label} ({name})" if len(names) > 1 else label)
    axes.set_xlabel("lambda")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"{report['model']}: attacked (solid) and clean (dashed)")
    axes.set_ylim(-2, 102)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
