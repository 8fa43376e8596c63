"""Evaluate defences against trained patches: the paper's Table 1 and Fig. 5, through the engine.

For every method (and every lambda of the methods that take one) the clean images, the patched
images and, when given, whole photographs (:func:`elgs.attacks.data.whole_photos`, decoded as the
service decodes an upload) go through :class:`elgs.engine.Engine` in batches of ``task="defend"``
requests, exactly as the service would run them; only ``Engine(model, thresholds).run(requests)`` and
the fields of :class:`~elgs.engine.Result` are used, so any registered method (``auto`` included)
is evaluated the same way. The figures (:mod:`elgs.attacks.figures`) per row:

- Table 1: top-1 accuracy on clean and patched images, targeted success, the share of fooled
  images whose label the defence restored, mean SSIM between input and defended image
  (scikit-image, as the paper), requests per second; for SLGS where its saliency region lies.
- Separated by confidence: clean answers kept and fooled images restored, by the defence and by
  ``final_predictions``, over all images and over those whose clean top-1 probability is >= 0.5.
- The attack score as a detector: AUROC clean vs patched, the shares flagged ``attacked``, and the
  false-positive rate on whole photographs.

Images are streamed in chunks; what stays in memory is :class:`~elgs.attacks.figures.Records`, a few
numbers per image, setting and patch (see :mod:`elgs.attacks.figures`), and the whole photographs
decoded at the model's input size (uint8, 150 KB each at 224 px).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from elgs.attacks.data import WholePhoto
from elgs.attacks.figures import (
    CONFIDENT_AT,
    Records,
    Reference,
    SettingRow,
    described_columns,
    format_photo_lines,
    format_separated,
    number,
    percent,
    photo_figures,
    rethreshold_rows,
    row_label,
    setting_row,
)
from elgs.attacks.patches import composite, patch_mask, place, placement_positions, top_right_position
from elgs.attacks.train import sidecar_path
from elgs.defenses import DEFAULT_THRESHOLD, get_defense, saliency_region
from elgs.engine import Engine, Request
from elgs.images import decode_for_model, image_to_tensor, open_image
from elgs.models import LoadedModel
from elgs.thresholds import REMOVAL_VIEW


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


def _uses_lambda(method: str) -> bool:
    try:
        return get_defense(method).uses_lambda
    except KeyError:  # not a registered defence: one row, and Engine.resolve names the error
        return False


def settings(methods: list[str], lambdas: list[float]) -> list[tuple[str, float | None]]:
    """``(method, lambda)`` rows: one per lambda for methods that take one, else one row."""
    rows = []
    for method in methods:
        if _uses_lambda(method):
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



@dataclass(frozen=True)
class EngineRun:
    """One image set defended through the engine under one setting.

    Attributes:
        records: per-image outcomes (N,).
        images: defended images (N, 3, S, S).
        saliency: ``S`` (N, S, S) where the method computed one, else None.
        saliency_method: canonical estimator spec (None: none used).
        attack_threshold: the threshold the verdicts were decided with (None: none).
        seconds: wall time of the engine calls.
    """

    records: Records
    images: torch.Tensor
    saliency: torch.Tensor | None
    saliency_method: str | None
    attack_threshold: float | None
    seconds: float


def run_engine(engine: Engine, images: torch.Tensor, method: str, lam: float | None, threshold: float,
               batch_size: int, saliency: str | None = None, attack_threshold: float | None = None) -> EngineRun:
    """Defend ``images`` (N, 3, S, S) through ``engine`` in batches of ``task="defend"`` requests.

    A result without ``defended_predictions`` or ``image`` (a cascade that answered from its screen)
    counts its ``final_predictions`` as the defended answer and its input as the defended image.
    """
    results, started = [], time.perf_counter()
    for chunk in images.split(batch_size):
        results += engine.run([Request(image=image, task="defend", method=method, lam=lam, threshold=threshold,
                                       saliency=saliency, attack_threshold=attack_threshold) for image in chunk])
    seconds = time.perf_counter() - started
    records = Records.build(
        original=[r.predictions[0].index for r in results], confidence=[r.predictions[0].score for r in results],
        defended=[(r.defended_predictions or r.final_predictions)[0].index for r in results],
        final=[r.final_predictions[0].index for r in results], score=[r.attack_score for r in results],
        attacked=[r.attacked for r in results],
        removal=[r.removal_prediction.index if r.removal_prediction else None for r in results],
        removal_score=[r.removal_score for r in results])
    maps = [r.saliency for r in results]
    first = results[0] if results else None
    defended = [image if r.image is None else r.image for image, r in zip(images, results)]
    return EngineRun(records=records, images=torch.stack(defended) if results else images[:0],
                     saliency=torch.stack(maps) if maps and all(m is not None for m in maps) else None,
                     saliency_method=first.saliency_method if first else None,
                     attack_threshold=first.attack_threshold if first else None, seconds=seconds)


@dataclass
class _PatchSums:
    """Running sums of one patch under one setting, and its per-image records."""

    records: list[Records] = field(default_factory=list)
    ssim: float = 0.0
    saliency: dict[str, float] = field(default_factory=dict)


@dataclass
class _SettingSums:
    """Running sums of one setting over the chunks seen so far."""

    method: str
    lam: float | None
    patches: list[_PatchSums]
    clean: list[Records] = field(default_factory=list)
    ssim_clean: float = 0.0
    seconds: float = 0.0
    processed: int = 0
    saliency_method: str | None = None
    attack_threshold: float | None = None
    photos: Records | None = None

    def add(self, run: EngineRun) -> None:
        self.seconds += run.seconds
        self.processed += len(run.records)
        self.saliency_method, self.attack_threshold = run.saliency_method, run.attack_threshold


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate` measured. ``to_dict()`` is the JSON that ``attack eval --json`` writes.

    Attributes:
        model, weights, input_size: the classifier.
        images: evaluated images; placement, threshold, saliency: the run's options.
        reference: labels, clean answers and confidences of the images.
        patches: per patch ``name``, ``path``, ``shape``, ``size``, ``target``, ``target_label``.
        photos: per whole photograph ``name``, ``photo``, ``format``, ``width``, ``height``.
        rows: one :class:`~elgs.attacks.figures.SettingRow` per method and lambda.
    """

    model: str
    weights: str
    input_size: int
    images: int
    placement: str
    threshold: float
    saliency: str | None
    reference: Reference
    patches: list[dict]
    photos: list[dict]
    rows: list[SettingRow]

    def to_dict(self) -> dict:
        return {"model": self.model, "weights": self.weights, "input_size": self.input_size, "images": self.images,
                "placement": self.placement, "threshold": self.threshold, "saliency": self.saliency,
                "confident_at": self.reference.confident_at, "labels": self.reference.labels.tolist(),
                "clean_answers": self.reference.answer.tolist(), "confidence": self.reference.confidence.tolist(),
                "patches": self.patches, "photos": self.photos, "rows": [row.to_dict() for row in self.rows]}


def _as_dict(report: EvaluationReport | dict) -> dict:
    return report.to_dict() if isinstance(report, EvaluationReport) else report


def _check_patches(patches: list[PatchSpec], placement: str, size: int) -> None:
    if placement not in ("fixed", "random"):
        raise ValueError(f"placement must be 'fixed' or 'random', got {placement!r}")
    for spec in patches:
        if not isinstance(spec.target, int):
            raise ValueError(f"{spec.path}: target must be resolved to a class index, got {spec.target!r}")
        patch_size = spec.patch.shape[-1]
        if placement == "fixed":
            top_right_position(size, patch_size)  # raises when the patch does not fit
        elif patch_size > size:
            raise ValueError(f"{spec.path}: a {patch_size} px patch does not fit a {size} px image")


def _resolved_table(engine: Engine, methods: list[str], lambdas: list[float], threshold: float,
                    saliency: str | None, attack_threshold: float | None) -> list[tuple[str, float | None]]:
    """The settings, each checked by the engine: bad names and out-of-range values fail before any work."""
    table = settings(methods, lambdas)
    if not table:
        raise ValueError(f"nothing to evaluate: methods {methods} with lambdas {lambdas} give no setting")
    size = engine.model.input_size
    for method, lam in table:
        engine.resolve(Request(image=torch.zeros(3, size, size), task="defend", method=method, lam=lam,
                               threshold=threshold, saliency=saliency, attack_threshold=attack_threshold))
    return table


def _patched_sets(images: torch.Tensor, patches: list[PatchSpec], placement: str,
                  generators: list[torch.Generator]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per patch: the images with it pasted (B, 3, S, S) and the (B, 1, S, S) canvas of where it is."""
    size, sets = images.shape[-1], []
    for spec, generator in zip(patches, generators):
        patch_size = spec.patch.shape[-1]
        positions = placement_positions(placement, len(images), size, patch_size, generator=generator)
        patch_canvas, mask_canvas = place(spec.patch.to(images.dtype), patch_mask(spec.shape, patch_size),
                                          positions, size, size)
        sets.append((composite(images, patch_canvas, mask_canvas), mask_canvas))
    return sets


@dataclass(frozen=True)
class _Run:
    """The options every engine call of one evaluation shares."""

    engine: Engine
    threshold: float
    batch_size: int
    saliency: str | None
    attack_threshold: float | None
    bar: object

    def defend(self, sums: _SettingSums, images: torch.Tensor) -> EngineRun:
        run = run_engine(self.engine, images, sums.method, sums.lam, self.threshold, self.batch_size, self.saliency,
                         self.attack_threshold)
        sums.add(run)
        self.bar.update(len(images))
        return run


def _evaluate_chunk(run: _Run, sums: _SettingSums, images: torch.Tensor,
                    patched_sets: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One chunk of images (and its patched copies) through one setting, added to ``sums``."""
    clean = run.defend(sums, images)
    sums.clean.append(clean.records)
    sums.ssim_clean += mean_ssim(images, clean.images) * len(images)
    for (patched, mask), patch in zip(patched_sets, sums.patches):
        attacked = run.defend(sums, patched)
        patch.records.append(attacked.records)
        patch.ssim += mean_ssim(patched, attacked.images) * len(images)
        if attacked.saliency is not None:
            for key, value in saliency_overlap(attacked.saliency, mask).items():
                patch.saliency[key] = patch.saliency.get(key, 0.0) + value * len(images)


def _decoded_photos(photos: Iterable[WholePhoto], size: int) -> tuple[list[dict], torch.Tensor | None]:
    """Descriptions and the photographs decoded as the service decodes uploads, (P, 3, S, S) uint8."""
    described, arrays = [], []
    for photo in photos:
        described.append({"name": photo.name, "photo": photo.photo, "format": photo.format, "width": photo.width,
                          "height": photo.height})
        arrays.append(torch.tensor(decode_for_model(photo.data, size)).permute(2, 0, 1))  # a writable copy
    return described, torch.stack(arrays) if arrays else None


def _run_photos(run: _Run, sums: _SettingSums, photos: torch.Tensor, chunk: int) -> None:
    parts = [run.defend(sums, part.float() / 255).records for part in photos.split(chunk)]
    sums.photos = Records.concat(parts)


def _reference(sums: _SettingSums, labels: list[torch.Tensor], confident_at: float) -> Reference:
    clean = Records.concat(sums.clean)
    return Reference(labels=torch.cat(labels).numpy().astype(np.int64), answer=clean.original,
                     confidence=clean.confidence, confident_at=confident_at)


def _setting_row(sums: _SettingSums, reference: Reference, patches: list[PatchSpec], photos: list[dict]) -> SettingRow:
    seen = len(reference.labels)
    extras = {spec.name: {"ssim": patch.ssim / seen,
                          "saliency": {k: v / seen for k, v in patch.saliency.items()} if patch.saliency else None}
              for spec, patch in zip(patches, sums.patches)}
    photo_row = None
    if sums.photos is not None:
        photo_row = photo_figures(sums.photos, *described_columns(photos))
    return setting_row(
        sums.method, sums.lam, reference, Records.concat(sums.clean),
        {spec.name: Records.concat(patch.records) for spec, patch in zip(patches, sums.patches)},
        {spec.name: spec.target for spec in patches}, saliency_method=sums.saliency_method,
        attack_threshold=sums.attack_threshold, photos=photo_row, ssim_clean=sums.ssim_clean / seen,
        images_per_second=sums.processed / sums.seconds if sums.seconds else None, attack_extras=extras)


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
    photos: Iterable[WholePhoto] = (),
    confident_at: float = CONFIDENT_AT,
    engine: Engine | None = None,
) -> EvaluationReport:
    """Every figure of the module docstring for ``patches`` against ``methods`` x ``lambdas``.

    Args:
        model: the classifier (the patches' model).
        data: a dataset of ``(image, label)`` or ``(images (N, 3, S, S), labels (N,))``.
        patches: patches to evaluate (targets resolved to indices).
        methods: defence names (any method the engine accepts).
        lambdas: lambdas for the methods that take one.
        placement: ``fixed`` (top-right, 10 px in) or ``random`` (seeded, the same for every method).
        batch_size: requests per engine batch.
        limit: evaluate the first ``limit`` images only.
        seed: seeds random placements.
        threshold: gradient-map block threshold.
        saliency: saliency estimator spec for SLGS and WLGS (None: the model's default).
        attack_threshold: attack-score threshold for every row (None: the engine's calibrated ones).
        progress: show a progress bar.
        chunk: images decoded at a time.
        workers: data loader workers for an on-disk dataset.
        photos: whole photographs (:func:`elgs.attacks.data.whole_photos`) for the false-positive rate.
        confident_at: clean top-1 probability from which an image counts as confident.
        engine: the engine to run (default ``Engine(model)``, with the model's calibrated thresholds).

    Returns:
        an :class:`EvaluationReport`.
    """
    _check_patches(patches, placement, model.input_size)
    if not 0 <= confident_at <= 1:
        raise ValueError(f"confident_at must be a probability in [0, 1], got {confident_at}")
    if batch_size < 1 or chunk < 1:
        raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size} and {chunk}")
    total = len(data[0]) if isinstance(data, tuple) else len(data)
    total = total if limit is None else min(limit, total)
    if total <= 0:
        raise ValueError("no images to evaluate")
    engine = engine or Engine(model)
    table = _resolved_table(engine, methods, lambdas, threshold, saliency, attack_threshold)
    described, decoded = _decoded_photos(photos, model.input_size)
    sums = [_SettingSums(method, lam, [_PatchSums() for _ in patches]) for method, lam in table]
    generators = [torch.Generator().manual_seed(seed * 1_000 + index) for index in range(len(patches))]
    bar = tqdm(total=len(table) * ((1 + len(patches)) * total + len(described)), disable=not progress, unit="img",
               desc="eval", dynamic_ncols=True)
    run = _Run(engine, threshold, batch_size, saliency, attack_threshold, bar)
    labels = []
    for images, chunk_labels in _image_chunks(data, chunk, limit, workers):
        if images.shape[-2:] != (model.input_size, model.input_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model takes "
                             f"{model.input_size}x{model.input_size}")
        labels.append(torch.as_tensor(chunk_labels))
        patched_sets = _patched_sets(images, patches, placement, generators)
        for setting in sums:
            bar.set_postfix(method=row_label({"method": setting.method, "lambda": setting.lam}))
            _evaluate_chunk(run, setting, images, patched_sets)
    for setting in sums if decoded is not None else ():
        _run_photos(run, setting, decoded, chunk)
    bar.close()
    reference = _reference(sums[0], labels, confident_at)
    return EvaluationReport(
        model=model.name, weights=model.weights, input_size=model.input_size, images=len(reference.labels),
        placement=placement, threshold=threshold, saliency=saliency, reference=reference,
        patches=[{"name": p.name, "path": str(p.path), "shape": p.shape, "size": int(p.patch.shape[-1]),
                  "target": p.target, "target_label": model.labels[p.target]} for p in patches],
        photos=described, rows=[_setting_row(s, reference, patches, described) for s in sums])


def rethreshold(report: EvaluationReport | dict, thresholds) -> dict:
    """The report (as JSON) with every row re-decided at the thresholds of ``thresholds``
    (:class:`elgs.thresholds.AttackThresholds`, e.g. a calibration file written after the evaluation
    ran), with :meth:`~elgs.attacks.figures.Records.decided_at` (the engine's verdict)."""
    report = json.loads(json.dumps(_as_dict(report)))
    reference = Reference(labels=np.asarray(report["labels"]), answer=np.asarray(report["clean_answers"]),
                          confidence=np.asarray(report["confidence"]), confident_at=report["confident_at"])
    report["rows"] = rethreshold_rows(
        report["rows"], reference, {patch["name"]: patch["target"] for patch in report["patches"]},
        lambda row: thresholds.lookup(row["method"], row["lambda"], row["saliency_method"]), report["photos"],
        lambda row: thresholds.lookup(REMOVAL_VIEW, row["lambda"]))
    return report


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



def format_table(report: EvaluationReport | dict) -> str:
    """The paper's Table 1 layout (one row per method and lambda; top-1 accuracy (%) clean and per patch,
    then success rate, restored share, SSIM and requests per second), then the figures separated by
    confidence, the whole photographs flagged, and the attack score as a detector."""
    report = _as_dict(report)
    names = [p["name"] for p in report["patches"]]
    header = f"{'method':<14}{'clean':>8}" + "".join(f"{name[:22]:>24}" for name in names)
    header += "".join(f"{'success':>9}{'restored':>10}" for _ in names) + f"{'SSIM':>8}{'req/s':>8}"
    lines = [f"{report['model']} ({report['weights']}), {report['images']} images at {report['input_size']}px, "
             f"patch placement {report['placement']}; top-1 accuracy %", header, "-" * len(header)]
    for row in report["rows"]:
        line = f"{row_label(row):<14}{100 * row['clean_accuracy']:>8.2f}"
        line += "".join(f"{100 * row['attacks'][n]['accuracy']:>24.2f}" for n in names)
        for name in names:
            attack = row["attacks"][name]
            line += percent(attack["success_rate"], 9) + percent(attack["restored_rate"], 10)
        line += f"{number(row['ssim_clean'], 8)}{number(row['images_per_second'], 8, 1)}"
        lines.append(line)
    slgs_rows = [row for row in report["rows"] if row["method"] == "slgs"]
    for name in names if slgs_rows and names and slgs_rows[0]["attacks"][names[0]]["saliency"] else []:
        overlap = slgs_rows[0]["attacks"][name]["saliency"]
        lines.append(f"SLGS saliency region vs {name}: {100 * overlap['region_in_patch']:.1f}% of the region lies "
                     f"in the patch (the patch is {100 * overlap['patch_area']:.1f}% of the image) and covers "
                     f"{100 * overlap['patch_in_region']:.1f}% of the patch; "
                     f"{100 * overlap['saliency_mass_in_patch']:.1f}% of the saliency mass is in the patch")
    lines.append("success: defended top-1 is the target (true class != target); restored: share of the images "
                 "the patch fooled whose true label the defence brought back; req/s: engine requests per second")
    for name in names:
        lines += ["", *format_separated(report["rows"], name, report.get("confident_at", CONFIDENT_AT))]
    photo_lines = format_photo_lines(report["rows"])
    if photo_lines:
        lines += ["", "whole photographs uploaded as they are (the false-positive rate of 'attacked'):", *photo_lines]
    lines += ["", *format_detector_table(report)]
    return "\n".join(lines)


def format_detector_table(report: EvaluationReport | dict) -> list[str]:
    """Per patch: the attack score as a detector and the accuracy of ``final_predictions``, per row."""
    report = _as_dict(report)
    lines = []
    for patch in report["patches"]:
        name = patch["name"]
        header = (f"{'method':<14}{'threshold':>10}{'AUROC':>7}{'AUROC fooled':>13}{'flags clean':>12}"
                  f"{'flags attacked':>15}{'flags fooled':>13}{'final clean':>12}{'final attacked':>15}"
                  f"{'final restored':>15}")
        lines += [f"attack score vs {name} (L1 distance of the softmax before and after the defence) and "
                  f"final_predictions; top-1 % against the labels", header, "-" * len(header)]
        for row in report["rows"]:
            attack = row["attacks"][name]
            lines.append(f"{row_label(row):<14}{number(row['attack_threshold'], 10)}{number(attack['auroc'], 7)}"
                         f"{number(attack['auroc_fooled'], 13)}{percent(row['clean_flagged'], 12)}"
                         f"{percent(attack['detection_rate'], 15)}{percent(attack['detection_rate_fooled'], 13)}"
                         f"{percent(row['clean_final_accuracy'], 12)}{percent(attack['final_accuracy'], 15)}"
                         f"{percent(attack['final_restored_rate'], 15)}")
    methods = sorted({row["saliency_method"] for row in report["rows"] if row["saliency_method"]})
    lines.append("AUROC: clean vs attacked images; AUROC fooled: correctly classified clean images vs the images "
                 "the patch fooled; flags: share above the threshold ('-': none calibrated)"
                 + (f"; saliency for SLGS/WLGS: {', '.join(methods)}" if methods else ""))
    return lines


def write_report(report: EvaluationReport | dict, path: str | Path) -> None:
    """Write ``report`` as indented JSON."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(_as_dict(report), indent=2))


def plot_accuracy(report: EvaluationReport | dict, path: str | Path) -> None:
    """Accuracy vs lambda per method, clean (dashed) and attacked (solid), as the paper's Fig. 5; PNG."""
    import matplotlib

    report = _as_dict(report)

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
