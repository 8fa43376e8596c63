"""Attack-score thresholds per model, method and lambda: where they live and how a request finds its own.

The attack score of a ``/defend`` answer is the L1 distance between the softmax vectors of pass 1
(the uploaded image) and pass 2 (the defended image), in [0, 2]. ``elgs calibrate`` runs clean
images through the engine and stores, per method, lambda and saliency estimator, the score that
a chosen fraction (the false-positive rate) of clean images exceeds. The score grows with lambda
and depends on the method, so a threshold is only valid for what it was calibrated with:

- a lambda between two calibrated lambdas of the same method gets the linear interpolation of their
  thresholds; a lambda outside the calibrated range gets the nearest end's threshold (below the
  range that errs towards "not attacked", above it towards "attacked");
- a saliency estimator that was not calibrated for SLGS/WLGS falls back to the method's entries
  for the model's default estimator (approximate: the answer says which threshold it used);
- a method never calibrated, another input size or random weights: no threshold, ``attacked`` is
  null (the request can still pass ``attack_threshold``).

Files: the package ships ``elgs/data/calibration.json`` (EfficientNet-Lite0, calibrated on the
offline samples of ``elgs data samples``); ``elgs calibrate`` writes ``$ELGS_CALIBRATION_FILE``
(default ``~/.config/elgs/calibration.json``, under ``$XDG_CONFIG_HOME`` when set). A model found in
the user file replaces the shipped entry for that model as a whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

SCORE_RANGE = (0.0, 2.0)


# The entries of the removal view's own threshold (one per lambda, shared by LGS, SLGS and WLGS: the view
# depends on the gradient map and lambda only) are stored under this method name.
REMOVAL_VIEW = "removal"


def user_calibration_path(configured: str | os.PathLike | None = None) -> Path:
    """``configured`` (the ``calibration_file`` setting, ``$ELGS_CALIBRATION_FILE``, which the CLI and the app
    pass down), else ``$XDG_CONFIG_HOME/elgs/calibration.json`` (``~/.config`` by default)."""
    if configured is not None:
        return Path(configured)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "elgs" / "calibration.json"


def shipped_calibration_path() -> Path:
    """The calibration file inside the installed package."""
    return Path(str(resources.files("elgs") / "data" / "calibration.json"))


@dataclass(frozen=True)
class ThresholdEntry:
    """One calibrated threshold.

    Attributes:
        method: defence name.
        lam: lambda (None for methods without one).
        saliency: canonical estimator spec (SLGS/WLGS), else None.
        threshold: the score above which an answer counts as attacked.
        clean_flagged: fraction of the calibration images whose score is above ``threshold``.
        false_positive_rate: fraction of them the full verdict calls attacked (:func:`elgs.engine.judge`:
            changed top-1, score above ``threshold``, original not surviving the removal check).
        false_positive_by_kind: that fraction per kind of calibration image (e.g. crops, whole photos as PNG, as JPEG).
    """

    method: str
    lam: float | None
    saliency: str | None
    threshold: float
    clean_flagged: float = 0.0
    false_positive_rate: float | None = None
    false_positive_by_kind: dict[str, float] | None = None


@dataclass(frozen=True)
class AttackThresholds:
    """All thresholds of one model.

    Attributes:
        model: model name.
        input_size: the input size they were calibrated at.
        fpr: the false-positive rate of the score asked for.
        verdict_fpr: the false-positive rate of the full verdict asked for (None: not asked).
        images: how many clean images were used.
        data: where the images came from (for humans).
        entries: the thresholds.
        default_saliency: the model's default estimator when it was calibrated.
    """

    model: str
    input_size: int
    fpr: float
    images: int
    data: str
    entries: tuple[ThresholdEntry, ...] = ()
    verdict_fpr: float | None = None
    default_saliency: str | None = None
    source: str = field(default="", compare=False)

    def lookup(self, method: str, lam: float | None, saliency: str | None = None) -> float | None:
        """The threshold for ``method`` at ``lam`` with estimator ``saliency``; None when not calibrated.

        See the module docstring for interpolation and fall-backs.
        """
        entries = [e for e in self.entries if e.method == method]
        if saliency is not None and entries:
            exact = [e for e in entries if e.saliency == saliency]
            default = [e for e in entries if e.saliency == self.default_saliency]
            entries = exact or default or entries
        if not entries:
            return None
        if lam is None or any(e.lam is None for e in entries):
            return entries[0].threshold
        points = sorted({e.lam: e.threshold for e in entries}.items())
        if lam <= points[0][0]:
            return points[0][1]
        if lam >= points[-1][0]:
            return points[-1][1]
        for (lam_low, low), (lam_high, high) in zip(points, points[1:]):
            if lam_low <= lam <= lam_high:
                return low + (high - low) * (lam - lam_low) / (lam_high - lam_low)
        return None  # unreachable: points are sorted

    def to_json(self) -> dict:
        """JSON-ready form (what the calibration file holds per model)."""
        data = asdict(self)
        data.pop("source")
        data.pop("model")
        data["entries"] = [asdict(e) for e in self.entries]
        return data

    @classmethod
    def from_json(cls, model: str, data: dict, source: str = "") -> AttackThresholds:
        """Parse one model's block; ``ValueError`` naming the bad field otherwise."""
        try:
            entries = tuple(ThresholdEntry(**entry) for entry in data.get("entries", []))
            return cls(model=model, input_size=int(data["input_size"]), fpr=float(data["fpr"]),
                       images=int(data.get("images", 0)), data=str(data.get("data", "")), entries=entries,
                       verdict_fpr=data.get("verdict_fpr"),
                       default_saliency=data.get("default_saliency"), source=source)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"calibration for {model!r} in {source or 'the file'} is malformed: {error}") from error


def read_calibration(path: str | os.PathLike) -> dict[str, dict]:
    """``{model: block}`` from a calibration file (empty when the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or delete it, or rerun `elgs calibrate`") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path} is not an elgs calibration file (no 'models' object)")
    return models


def write_calibration(path: str | os.PathLike, thresholds: AttackThresholds) -> Path:
    """Write ``thresholds`` into ``path``, keeping the other models already there."""
    path = Path(path)
    models = read_calibration(path)
    models[thresholds.model] = thresholds.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "models": models}, indent=2, sort_keys=True) + "\n")
    return path


def load_thresholds(model: str, input_size: int, weights: str = "pretrained",
                    paths: tuple[str | os.PathLike, ...] | None = None,
                    user_file: str | os.PathLike | None = None) -> AttackThresholds | None:
    """The thresholds of ``model`` from the first file that has it (user file, then the shipped one).

    ``paths`` replaces both; else ``user_file`` (the ``calibration_file`` setting) or the default user
    location (:func:`user_calibration_path`) comes before the shipped file.

    A file whose block for ``model`` was calibrated at another input size is skipped (the score's
    distribution depends on it). Returns None for random weights or when no file fits.
    """
    if weights != "pretrained":
        return None
    for path in paths if paths is not None else (user_calibration_path(user_file), shipped_calibration_path()):
        block = read_calibration(path).get(model)
        if block is not None:
            thresholds = AttackThresholds.from_json(model, block, source=str(path))
            if thresholds.input_size == input_size:
                return thresholds
    return None
