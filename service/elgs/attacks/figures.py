"""What an evaluation measures, kept apart: typed per-image records and the figures computed from them.

One set of functions turns per-image outcomes into figures, for ``elgs attack eval`` (in process,
through :class:`elgs.engine.Engine`) and for ``elgs bench robustness`` (through a running service),
so the two report the same quantities by the same code. Per defence setting:

- Table 1 (the paper's layout): top-1 accuracy against the labels on clean and patched images, the
  attack's targeted success, the share of fooled images whose label the defence restored, SSIM.
- Separated by confidence (issue 15): over all images and over the *confident* ones (clean top-1
  probability >= ``confident_at``, 0.5): clean answers kept by the defence and by
  ``final_predictions``, fooled images restored by the defence and by ``final_predictions``. Here the
  reference is the *clean answer*, the model's undefended top-1 on the clean image (for a folder
  labelled by the model, the label), so the figures say what the defence changes, not how good the
  model is.
- The attack score as a detector: AUROC clean vs patched (all and confident images), the share flagged.
- Whole photographs (:func:`elgs.attacks.data.whole_photos`): the share flagged ``attacked`` (the
  false-positive rate on what users upload) and the share whose ``final_predictions`` top-1 differs
  from the original top-1.

Records hold a few numbers per image (about 40 bytes: no image, no map), so an evaluation's memory
grows with the number of images times settings times patches by that much and by nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch

from elgs.attacks.metrics import auroc
from elgs.engine import NO_REMOVAL, verdicts

CONFIDENT_AT = 0.5


@dataclass(frozen=True)
class Share:
    """``count`` of ``total`` and their ratio (None when ``total`` is 0)."""

    count: int
    total: int
    rate: float | None

    @classmethod
    def of(cls, mask: np.ndarray, within: np.ndarray | None = None) -> Share:
        """The share of True in ``mask`` (bool (N,)), counted over ``within`` (bool (N,)) when given."""
        mask = np.asarray(mask, dtype=bool)
        if within is not None:
            mask = mask[np.asarray(within, dtype=bool)]
        total, count = int(mask.size), int(mask.sum())
        return cls(count=count, total=total, rate=count / total if total else None)


@dataclass(frozen=True)
class Records:
    """Per-image outcomes of one image set under one setting, all (N,) arrays.

    Attributes:
        original: pass-1 top-1 class (the undefended answer).
        confidence: pass-1 top-1 probability.
        defended: pass-2 top-1 class (``predictions`` of a defend answer).
        final: top-1 of ``final_predictions``.
        score: attack score (float64).
        attacked: the verdict (bool); None when no threshold decided it.
        removal: top-1 with the suspect removed (:data:`elgs.engine.NO_REMOVAL` where there was no check).
        removal_score: the removal view's attack score (0 where there was no check).
    """

    original: np.ndarray
    confidence: np.ndarray
    defended: np.ndarray
    final: np.ndarray
    score: np.ndarray
    attacked: np.ndarray | None
    removal: np.ndarray | None = None
    removal_score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.original)

    @classmethod
    def build(cls, original, confidence, defended, final, score, attacked, removal=None,
              removal_score=None) -> Records:
        """From sequences; ``attacked`` becomes None unless every entry is decided; ``removal`` and
        ``removal_score`` entries may be None (no check)."""
        flags = None if attacked is None or any(flag is None for flag in attacked) else np.asarray(attacked, bool)
        removal = None if removal is None else np.asarray([NO_REMOVAL if r is None else r for r in removal], np.int64)
        removal_score = None if removal_score is None else np.asarray(
            [0.0 if r is None else r for r in removal_score], np.float64)
        complete = lambda values: None if values is None or len(values) != len(original) else values  # noqa: E731
        return cls(original=np.asarray(original, dtype=np.int64), confidence=np.asarray(confidence, np.float32),
                   defended=np.asarray(defended, np.int64), final=np.asarray(final, np.int64),
                   score=np.asarray(score, np.float64), attacked=flags,
                   removal=complete(removal), removal_score=complete(removal_score))

    @classmethod
    def concat(cls, parts: Sequence[Records]) -> Records:
        """The records of ``parts`` one after the other."""
        if not parts:
            return cls.build([], [], [], [], [], [])
        def joined(name: str) -> np.ndarray | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(**{f.name: joined(f.name) for f in fields(cls)})

    def decided_at(self, threshold: float | None, removal_threshold: float | None = None) -> Records:
        """The records re-decided at ``threshold`` (and the removal view's ``removal_threshold``) with the
        engine's verdict (:func:`elgs.engine.verdicts`: a view changed the top-1 by more than its threshold,
        original not surviving the removal check) and ``final`` the answer with the suspect removed when
        attacked (the defended one without a removal check), else the original. The rule of one round (lgs,
        slgs, wlgs, the filters; for ``auto``, its strong stage's: a re-decided screen is not modelled). No
        ``threshold``: a changed top-1 is undecided (``final`` the defended answer), an unchanged one is not
        attacked (the removal view is not consulted)."""
        changed = self.defended != self.original
        if threshold is None:
            return replace(self, attacked=None, final=np.where(changed, self.defended, self.original))
        removal = None if self.removal is None else torch.from_numpy(self.removal)
        removal_score = None if self.removal_score is None else torch.from_numpy(self.removal_score)
        _, flags = verdicts(torch.from_numpy(self.original), torch.from_numpy(self.defended),
                            torch.from_numpy(self.score), threshold, removal, removal_score, removal_threshold,
                            torch.from_numpy(self.confidence))
        flags = flags.numpy()
        # attacked: the answer with the suspect removed (the engine's final), where there was a removal check
        answer = self.defended if self.removal is None else np.where(self.removal != NO_REMOVAL, self.removal,
                                                                      self.defended)
        return replace(self, attacked=flags, final=np.where(flags, answer, self.original))

    def to_dict(self) -> dict:
        """JSON-ready lists."""
        return {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).tolist()) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Records:
        return cls.build(data["original"], data["confidence"], data["defended"], data["final"], data["score"],
                         data["attacked"], data.get("removal"), data.get("removal_score"))


@dataclass(frozen=True)
class CleanFigures:
    """Clean images of one subset: how many answers survive the defence.

    Attributes:
        images: images in the subset.
        kept: defended top-1 equals the clean answer.
        final_kept: ``final_predictions`` top-1 equals the clean answer.
        flagged: verdict ``attacked`` (None: undecided).
    """

    images: int
    kept: Share
    final_kept: Share
    flagged: Share | None


@dataclass(frozen=True)
class AttackedFigures:
    """Patched images of one subset whose clean answer is not the target.

    Attributes:
        images: such images in the subset.
        fooled: undefended top-1 is the target.
        restored: of the fooled, the defended top-1 is the clean answer.
        final_restored: of the fooled, ``final_predictions`` top-1 is the clean answer.
        final_correct: of all, ``final_predictions`` top-1 is the clean answer.
        flagged: verdict ``attacked`` (None: undecided).
    """

    images: int
    fooled: Share
    restored: Share
    final_restored: Share
    final_correct: Share
    flagged: Share | None


@dataclass(frozen=True)
class PhotoFigures:
    """Whole photographs (:func:`elgs.attacks.data.whole_photos`) under one setting.

    Attributes:
        images: photographs.
        flagged: verdict ``attacked``: the false-positive rate (None: undecided).
        flagged_by_format: the same per format (``JPEG``, ``PNG``).
        flagged_names: the flagged uploads.
        flagged_photos: the photographs with at least one flagged upload (scikit-image names).
        final_changed: ``final_predictions`` top-1 differs from the original top-1.
        attack_score_mean: mean attack score.
        per_image: the records.
    """

    images: int
    flagged: Share | None
    flagged_by_format: dict[str, Share | None]
    flagged_names: list[str]
    flagged_photos: list[str]
    final_changed: Share
    attack_score_mean: float
    per_image: Records


@dataclass(frozen=True)
class AttackRow:
    """One patch under one setting. Table 1 figures are against the labels (``success_rate``: of
    images whose label is not the target); ``by_confidence`` against the clean answer."""

    accuracy: float
    success_rate: float | None
    undefended_success_rate: float | None
    restored_rate: float | None
    ssim: float | None
    saliency: dict[str, float] | None
    auroc: float
    auroc_confident: float | None
    auroc_fooled: float | None
    detection_rate: float | None
    detection_rate_fooled: float | None
    final_accuracy: float
    final_restored_rate: float | None
    attack_score_mean: float
    by_confidence: dict[str, AttackedFigures]
    per_image: Records


@dataclass(frozen=True)
class SettingRow:
    """One defence setting (method and lambda): clean figures, one :class:`AttackRow` per patch, the
    whole photographs, and requests per second (``images_per_second``)."""

    method: str
    lam: float | None
    saliency_method: str | None
    attack_threshold: float | None
    clean_accuracy: float
    clean_final_accuracy: float
    clean_flagged: float | None
    clean_attack_score_mean: float
    by_confidence: dict[str, CleanFigures]
    attacks: dict[str, AttackRow]
    whole_photos: PhotoFigures | None
    images_per_second: float | None
    ssim_clean: float | None = None
    per_image: Records | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready; ``lam`` is written as ``lambda``, records as lists."""
        data = asdict(self, dict_factory=_json_dict)
        return {("lambda" if key == "lam" else key): value for key, value in data.items()}


def _json_dict(items: list[tuple[str, object]]) -> dict:
    """``asdict``'s factory: NumPy arrays (the records' fields) become lists."""
    return {key: value.tolist() if isinstance(value, np.ndarray | np.generic) else value for key, value in items}


def _mean(mask: np.ndarray) -> float | None:
    return float(mask.mean()) if mask.size else None


def _auroc(negatives: np.ndarray, positives: np.ndarray) -> float | None:
    if not len(negatives) or not len(positives):
        return None
    return auroc(torch.from_numpy(negatives), torch.from_numpy(positives))


def clean_figures(clean: Records, answer: np.ndarray, within: np.ndarray) -> CleanFigures:
    """:class:`CleanFigures` of the images in ``within`` (bool (N,)); ``answer``: the clean answers (N,)."""
    flagged = None if clean.attacked is None else Share.of(clean.attacked, within)
    return CleanFigures(images=int(within.sum()), kept=Share.of(clean.defended == answer, within),
                        final_kept=Share.of(clean.final == answer, within), flagged=flagged)


def attacked_figures(patched: Records, answer: np.ndarray, target: int, within: np.ndarray) -> AttackedFigures:
    """:class:`AttackedFigures` of the images in ``within`` whose clean answer is not ``target``."""
    eligible = within & (answer != target)
    fooled = eligible & (patched.original == target)
    return AttackedFigures(
        images=int(eligible.sum()), fooled=Share.of(patched.original == target, eligible),
        restored=Share.of(patched.defended == answer, fooled), final_restored=Share.of(patched.final == answer, fooled),
        final_correct=Share.of(patched.final == answer, eligible),
        flagged=None if patched.attacked is None else Share.of(patched.attacked, eligible))


def attack_row(clean: Records, patched: Records, labels: np.ndarray, answer: np.ndarray, confident: np.ndarray,
               target: int, *, ssim: float | None = None, saliency: dict[str, float] | None = None) -> AttackRow:
    """Every figure of one patch under one setting from the records of the clean and patched images."""
    eligible = labels != target
    fooled = eligible & (patched.original == target)  # the attack worked before the defence
    clean_correct = clean.original == labels
    flags = patched.attacked
    everything = np.ones(len(labels), dtype=bool)
    return AttackRow(
        accuracy=float((patched.defended == labels).mean()),
        success_rate=_mean((patched.defended == target)[eligible]),
        undefended_success_rate=_mean(fooled[eligible]),
        restored_rate=_mean((patched.defended == labels)[fooled]),
        ssim=ssim, saliency=saliency,
        auroc=_auroc(clean.score, patched.score),
        auroc_confident=_auroc(clean.score[confident], patched.score[confident]),
        auroc_fooled=_auroc(clean.score[clean_correct], patched.score[fooled]) if fooled.any() else None,
        detection_rate=None if flags is None else _mean(flags),
        detection_rate_fooled=None if flags is None or not fooled.any() else _mean(flags[fooled]),
        final_accuracy=float((patched.final == labels).mean()),
        final_restored_rate=_mean((patched.final == labels)[fooled]),
        attack_score_mean=float(patched.score.mean()),
        by_confidence={"all": attacked_figures(patched, answer, target, everything),
                       "confident": attacked_figures(patched, answer, target, confident)},
        per_image=patched,
    )


def photo_figures(records: Records, names: Sequence[str], formats: Sequence[str],
                  sources: Sequence[str]) -> PhotoFigures:
    """:class:`PhotoFigures` from the records of whole photographs (``names``, ``formats`` and source
    ``sources``: one per record)."""
    flags = records.attacked
    formats = np.asarray(formats)
    flagged = [] if flags is None else [i for i, flag in enumerate(flags.tolist()) if flag]
    return PhotoFigures(
        images=len(records),
        flagged=None if flags is None else Share.of(flags),
        flagged_by_format={f: None if flags is None else Share.of(flags, formats == f)
                           for f in dict.fromkeys(formats.tolist())},
        flagged_names=[names[i] for i in flagged],
        flagged_photos=list(dict.fromkeys(sources[i] for i in flagged)),
        final_changed=Share.of(records.final != records.original),
        attack_score_mean=float(records.score.mean()) if len(records) else float("nan"),
        per_image=records,
    )


@dataclass(frozen=True)
class Reference:
    """What every row of an evaluation shares, (N,) each: the labels, the clean answers (undefended
    top-1 on the clean images) and their probabilities; ``confident``: probability >= ``confident_at``."""

    labels: np.ndarray
    answer: np.ndarray
    confidence: np.ndarray
    confident_at: float = CONFIDENT_AT

    @property
    def confident(self) -> np.ndarray:
        return self.confidence >= self.confident_at


def setting_row(method: str, lam: float | None, images: Reference, clean: Records, patched: dict[str, Records],
                targets: dict[str, int], *, saliency_method: str | None, attack_threshold: float | None,
                images_per_second: float | None, photos: PhotoFigures | None = None, ssim_clean: float | None = None,
                attack_extras: dict[str, dict] | None = None) -> SettingRow:
    """A :class:`SettingRow` from records: ``patched`` and ``targets`` by patch name; ``attack_extras``
    by patch name: ``ssim`` and ``saliency`` keyword arguments of :func:`attack_row`."""
    everything = np.ones(len(images.labels), dtype=bool)
    return SettingRow(
        method=method, lam=lam, saliency_method=saliency_method, attack_threshold=attack_threshold,
        clean_accuracy=float((clean.defended == images.labels).mean()),
        clean_final_accuracy=float((clean.final == images.labels).mean()),
        clean_flagged=None if clean.attacked is None else _mean(clean.attacked),
        clean_attack_score_mean=float(clean.score.mean()),
        by_confidence={"all": clean_figures(clean, images.answer, everything),
                       "confident": clean_figures(clean, images.answer, images.confident)},
        attacks={name: attack_row(clean, records, images.labels, images.answer, images.confident, targets[name],
                                  **(attack_extras or {}).get(name, {}))
                 for name, records in patched.items()},
        whole_photos=photos, images_per_second=images_per_second, ssim_clean=ssim_clean, per_image=clean)


def redecide_row(row: dict, images: Reference, targets: dict[str, int], threshold: float | None,
                 photos: Sequence[dict] = (), removal_threshold: float | None = None) -> dict:
    """A JSON row (:meth:`SettingRow.to_dict`) re-decided at ``threshold`` and ``removal_threshold``
    (:meth:`Records.decided_at`); ``photos``: the whole photographs' ``name``, ``format`` and ``photo``."""
    clean = Records.from_dict(row["per_image"]).decided_at(threshold, removal_threshold)
    patched = {name: Records.from_dict(attack["per_image"]).decided_at(threshold, removal_threshold)
               for name, attack in row["attacks"].items()}
    extras = {name: {"ssim": attack.get("ssim"), "saliency": attack.get("saliency")}
              for name, attack in row["attacks"].items()}
    photos = None
    if row.get("whole_photos"):
        photos = photo_figures(Records.from_dict(row["whole_photos"]["per_image"]).decided_at(threshold,
                                                                                          removal_threshold),
                               *described_columns(photos))
    return setting_row(row["method"], row["lambda"], images, clean, patched, targets,
                       saliency_method=row["saliency_method"], attack_threshold=threshold,
                       images_per_second=row["images_per_second"], photos=photos, ssim_clean=row.get("ssim_clean"),
                       attack_extras=extras).to_dict()


def described_columns(photos: Sequence[dict]) -> tuple[list[str], list[str], list[str]]:
    """Names, formats and source photographs of described whole photographs."""
    return [p["name"] for p in photos], [p["format"] for p in photos], [p["photo"] for p in photos]


def rethreshold_rows(rows: list[dict], images: Reference, targets: dict[str, int],
                     threshold_of: Callable[[dict], float | None], photos: Sequence[dict] = (),
                     removal_threshold_of: Callable[[dict], float | None] = lambda row: None) -> list[dict]:
    """Every row re-decided at ``threshold_of(row)`` and ``removal_threshold_of(row)``."""
    return [redecide_row(row, images, targets, threshold_of(row), photos, removal_threshold_of(row)) for row in rows]


# Formatting helpers shared by the tables of attack eval and bench robustness.

def percent(value: float | None, width: int) -> str:
    """A right-aligned percentage, or '-' where there was nothing to count."""
    return f"{'-':>{width}}" if value is None else f"{100 * value:>{width - 1}.1f}%"


def number(value: float | None, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def row_label(row: dict) -> str:
    label = row["method"].upper() if row["method"] != "none" else "no defence"
    return label if row["lambda"] is None else f"{label} {row['lambda']:g}"


def format_separated(rows: list[dict], patch: str, confident_at: float = CONFIDENT_AT) -> list[str]:
    """The table of issue 15: per row, over all and over confident images: clean answers kept, fooled
    images restored (by the defence, by ``final_predictions``), the AUROC, the whole photographs
    flagged, and requests per second."""
    header = (f"{'method':<14}" + "".join(f"{'kept':>7}{'final':>7}{'fooled':>7}{'restored':>9}{'final':>7}{'AUROC':>7}"
                                          for _ in range(2)) + f"{'photos flagged':>16}{'req/s':>8}")
    lines = [f"vs {patch}, against the clean answer: all images | confident images (clean top-1 probability >= "
             f"{confident_at:g}); 'final': final_predictions", header, "-" * len(header)]
    for row in rows:
        attack = row["attacks"][patch]
        line = f"{row_label(row):<14}"
        for subset, auroc_key in (("all", "auroc"), ("confident", "auroc_confident")):
            clean, attacked = row["by_confidence"][subset], attack["by_confidence"][subset]
            line += (f"{percent(clean['kept']['rate'], 7)}{percent(clean['final_kept']['rate'], 7)}"
                     f"{attacked['fooled']['count']:>7}{percent(attacked['restored']['rate'], 9)}"
                     f"{percent(attacked['final_restored']['rate'], 7)}{number(attack[auroc_key], 7)}")
        photos = row.get("whole_photos")
        flagged = photos["flagged"] if photos else None
        cell = f"{flagged['count']}/{flagged['total']}" if flagged else "-"
        line += f"{cell:>16}"
        line += number(row["images_per_second"], 8, 1)
        lines.append(line)
    counts = rows[0]["by_confidence"] if rows else None
    if counts:
        lines.append(f"images: {counts['all']['images']} all, {counts['confident']['images']} confident; kept: clean "
                     "images whose answer the defence keeps; fooled: patched images whose undefended top-1 is the "
                     "target; restored: of those, the defended answer is the clean one")
    return lines


def format_photo_lines(rows: list[dict]) -> list[str]:
    """Per row, the whole photographs flagged 'attacked' (by format) and their names."""
    lines = []
    for row in rows:
        photos = row.get("whole_photos")
        if not photos:
            continue
        if photos["flagged"] is None:
            lines.append(f"{row_label(row)}: {photos['images']} whole photographs, no threshold: nothing decided")
            continue
        formats = ", ".join(f"{name} {share['count']}/{share['total']}"
                            for name, share in photos["flagged_by_format"].items() if share)
        names = ", ".join(photos["flagged_names"][:12]) + (" ..." if len(photos["flagged_names"]) > 12 else "")
        lines.append(f"{row_label(row)}: {photos['flagged']['count']} of {photos['images']} uploads flagged "
                     f"({formats}), from {len(photos['flagged_photos'])} photographs; final answer changed on "
                     f"{photos['final_changed']['count']}" + (f"; flagged: {names}" if names else ""))
    return lines
