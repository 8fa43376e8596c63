"""Robustness judged through a running service: clean and patched crops, and whole photographs, over HTTP.

    elgs serve --models efficientnet_lite0 &
    elgs bench robustness --data samples/heldout --patch runs/toaster.png --methods slgs,lgs \
        --json runs/service_robustness.json

Every image of ``--data`` (a folder with the ``labels.json`` of ``elgs data samples``, or any folder
of images, then labelled by the service's own clean top-1 from ``/classify``) is sent twice to
``POST /defend/{method}`` for each method: as it is, and with the patch pasted at the paper's test
placement (top-right, 10 px from both edges, at the model's input size: the image is resized to it
first, as the service would). The whole photographs of :func:`elgs.attacks.data.whole_photos` are
uploaded as they are. Nothing is computed locally but the patching and the counting, so the figures
are the service's: its decoding, batching, estimator defaults, calibrated threshold and
``final_predictions``. They are the figures of ``elgs attack eval`` (:mod:`elgs.attacks.figures`,
the same code) but SSIM, with requests per second measured through HTTP at ``--workers`` in flight.
Then the checks of issues 9 and 15 (PASS/FAIL lines; the exit status is 1 when one fails).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from elgs.attacks.data import WholePhoto
from elgs.attacks.figures import (
    CONFIDENT_AT,
    Records,
    Reference,
    format_photo_lines,
    format_separated,
    percent,
    photo_figures,
    row_label,
    setting_row,
)
from elgs.attacks.patches import top_right_position
from elgs.thresholds import REMOVAL_VIEW

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def paste(image: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """``image`` (S, S, 3) uint8 with ``patch`` (P, P, 3) at the test placement; a copy."""
    top, left = top_right_position(image.shape[0], patch.shape[0])
    patched = image.copy()
    patched[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return patched


def load_images(folder: Path, size: int) -> tuple[list[str], list[np.ndarray], dict[str, int]]:
    """Names, (size, size, 3) uint8 arrays resized like the service (Pillow bilinear), labels.json labels."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ValueError(f"no images in {folder}")
    labels_file = folder / "labels.json"
    labels = {}
    if labels_file.is_file():
        labels = {name: entry["index"] for name, entry in json.loads(labels_file.read_text())["labels"].items()}
    arrays = [np.asarray(Image.open(folder / name).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
              for name in names]
    return names, arrays, labels


@dataclass(frozen=True)
class Upload:
    """One file to send: its name, bytes and content type."""

    name: str
    data: bytes
    content_type: str = "image/png"


class Service:
    """A thin HTTP client that retries 503 (a full queue) and 504 (past the deadline), as a patient caller would."""

    def __init__(self, url: str, model: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout, trust_env=False)
        self.model = model

    # How long one upload keeps being retried: a busy 2-core host answers SLGS at about 1 per second, and a
    # server that sheds load says "retry in 1 s" long before the queue ahead of the caller has drained.
    PATIENCE_S = 600.0

    def post(self, path: str, upload: Upload, **params) -> dict:
        give_up = time.monotonic() + self.PATIENCE_S
        while True:
            response = self.client.post(path, params={"model": self.model, **params},
                                        files={"image": (upload.name, upload.data, upload.content_type)})
            if response.status_code not in (503, 504) or time.monotonic() > give_up:
                break
            time.sleep(float(response.headers.get("Retry-After", 1)))
        if response.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def model_info(self) -> dict:
        info = next((m for m in self.client.get("/models").json()["models"] if m["name"] == self.model), None)
        if info is None:
            raise ValueError(f"the service at {self.url} has no model {self.model!r} loaded")
        return info


def records_of(answers: Sequence[dict]) -> Records:
    """The per-image records of ``/defend`` answers."""
    top1 = lambda key: [a[key][0]["index"] for a in answers]  # noqa: E731
    return Records.build(original=top1("original_predictions"),
                         confidence=[a["original_predictions"][0]["score"] for a in answers],
                         defended=top1("predictions"), final=top1("final_predictions"),
                         score=[a["attack_score"] for a in answers], attacked=[a["attacked"] for a in answers],
                         removal=[(a.get("removal_top1") or {}).get("index") for a in answers],
                         removal_score=[a.get("removal_score") for a in answers])


@dataclass(frozen=True)
class Workload:
    """What every method is asked: the clean and patched crops, the whole photographs, the labels."""

    clean: list[Upload]
    patched: list[Upload]
    photos: list[WholePhoto]
    labels: np.ndarray
    patch_name: str
    target: int
    confident_at: float = CONFIDENT_AT

    @property
    def uploads(self) -> list[Upload]:
        return [*self.clean, *self.patched,
                *(Upload(p.name, p.data, CONTENT_TYPES[p.format]) for p in self.photos)]


def evaluate_method(service: Service, method: str, work: Workload, *, workers: int, params: dict,
                    thresholds=None) -> dict:
    """Every figure of one method (a :class:`~elgs.attacks.figures.SettingRow` as JSON, plus ``decided_by``);
    answers are requested ``workers`` at a time (so the server batches).

    ``thresholds`` (:class:`elgs.thresholds.AttackThresholds`) decides ``attacked`` and ``final_predictions``
    afterwards (:meth:`~elgs.attacks.figures.Records.decided_at`) only where the service had no threshold."""
    uploads = work.uploads
    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(lambda upload: service.post(f"/defend/{method}", upload, **params), uploads))
    seconds = time.perf_counter() - started
    n = len(work.clean)
    parts = [records_of(answers[:n]), records_of(answers[n : 2 * n]), records_of(answers[2 * n :])]
    threshold, decided_by = answers[0]["attack_threshold"], "the service"
    if parts[0].attacked is None and thresholds is not None:
        threshold = thresholds.lookup(method, answers[0]["lambda"], answers[0].get("saliency"))
        if threshold is not None:
            decided_by = f"afterwards, at the threshold of {thresholds.source}"
            removal_threshold = thresholds.lookup(REMOVAL_VIEW, answers[0]["lambda"])
            parts = [part.decided_at(threshold, removal_threshold) for part in parts]
    clean, patched, photos = parts
    reference = Reference(labels=work.labels, answer=clean.original, confidence=clean.confidence,
                          confident_at=work.confident_at)
    photo_row = photo_figures(photos, [p.name for p in work.photos], [p.format for p in work.photos],
                              [p.photo for p in work.photos]) if work.photos else None
    row = setting_row(method, answers[0]["lambda"], reference, clean, {work.patch_name: patched},
                      {work.patch_name: work.target}, saliency_method=answers[0].get("saliency"),
                      attack_threshold=threshold, images_per_second=len(uploads) / seconds, photos=photo_row)
    return {**row.to_dict(), "decided_by": decided_by, "requests": len(uploads), "seconds": seconds}


def _at_least(value: float | None, bound: float) -> bool:
    return value is not None and value >= bound


def _text(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def checks(rows: dict[str, dict], patch: str) -> list[tuple[str, bool]]:
    """Issue 9's and issue 15's 'what must hold', for the rows present. A figure that could not be
    measured (no image fooled) fails its check."""
    results = []
    slgs, lgs = rows.get("slgs"), rows.get("lgs")
    restored = {name: row["attacks"][patch]["restored_rate"] for name, row in rows.items()}
    if slgs and lgs:
        results += [
            (f"SLGS restores >= LGS - 5 points ({_text(restored['slgs'])} vs {_text(restored['lgs'])})",
             restored["lgs"] is not None and _at_least(restored["slgs"], restored["lgs"] - 0.05)),
            (f"SLGS keeps >= as many clean images correct as LGS ({_text(slgs['clean_accuracy'])} vs "
             f"{_text(lgs['clean_accuracy'])})", slgs["clean_accuracy"] >= lgs["clean_accuracy"]),
        ]
    if slgs:
        results.append((f"SLGS restores >= 55% of fooled images ({_text(restored['slgs'])})",
                        _at_least(restored["slgs"], 0.55)))
    for name, row in rows.items():
        attack = row["attacks"][patch]
        results += [
            (f"{name}: attack-score AUROC >= 0.95 ({attack['auroc']:.4f})", _at_least(attack["auroc"], 0.95)),
            (f"{name}: final_predictions keep >= 93% of clean images ({_text(row['clean_final_accuracy'])})",
             _at_least(row["clean_final_accuracy"], 0.93)),
            (f"{name}: final_predictions restore >= 55% of fooled images ({_text(attack['final_restored_rate'])})",
             _at_least(attack["final_restored_rate"], 0.55)),
        ]
        if row["method"] == "auto":  # issue 15's cascade
            confident = attack["by_confidence"]["confident"]["final_restored"]
            results += [
                (f"auto: final_predictions keep >= 98% of clean images ({_text(row['clean_final_accuracy'])})",
                 _at_least(row["clean_final_accuracy"], 0.98)),
                (f"auto: final_predictions restore >= 95% of fooled confident images ({_text(confident['rate'])} of "
                 f"{confident['total']})", confident["total"] > 0 and _at_least(confident["rate"], 0.95)),
                (f"auto: final_predictions restore >= 60% of fooled images ({_text(attack['final_restored_rate'])})",
                 _at_least(attack["final_restored_rate"], 0.60)),
            ]
        photos = row.get("whole_photos")
        if photos and photos["flagged"] is not None:
            flagged = photos["flagged_photos"]
            results.append((f"{name}: at most 1 whole photograph flagged, and not chelsea "
                            f"({', '.join(flagged) or 'none'})", len(flagged) <= 1 and "chelsea" not in flagged))
    return results


def format_rows(rows: list[dict], patch: str, confident_at: float = CONFIDENT_AT) -> str:
    """The Table-1 figures per method, then the figures separated by confidence and the whole photographs."""
    header = f"{'method':<14}{'clean':>8}{'patched':>9}{'fooled':>8}{'restored':>10}{'AUROC':>8}{'flags clean':>12}"
    lines = [header, "-" * len(header)]
    for row in rows:
        attack = row["attacks"][patch]
        fooled = attack["by_confidence"]["all"]["fooled"]["count"]
        lines.append(f"{row_label(row):<14}{percent(row['clean_accuracy'], 8)}{percent(attack['accuracy'], 9)}"
                     f"{fooled:>8}{percent(attack['restored_rate'], 10)}{attack['auroc'] or 0:>8.4f}"
                     f"{percent(row['clean_flagged'], 12)}")
    lines += ["", *format_separated(rows, patch, confident_at)]
    photo_lines = format_photo_lines(rows)
    if photo_lines:
        lines += ["", "whole photographs uploaded as they are (the false-positive rate of 'attacked'):", *photo_lines]
    return "\n".join(lines)


def _patch_and_target(path: Path, target: int | None) -> tuple[np.ndarray, int, dict]:
    """The patch (P, P, 3) uint8, its target (``target``, else its JSON sidecar's) and the sidecar."""
    sidecar = path.with_suffix(".json")
    meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    target = target if target is not None else meta.get("target")
    if target is None:
        raise ValueError(f"{path}: no sidecar names the target; pass --target")
    return np.asarray(Image.open(path).convert("RGB")), int(target), meta


def _labels(service: Service, names: list[str], clean: list[Upload], recorded: dict[str, int],
            workers: int) -> np.ndarray:
    if recorded:
        return np.array([recorded[name] for name in names])
    # The service's own clean top-1, as `elgs attack eval` does for a plain folder.
    with ThreadPoolExecutor(workers) as pool:
        return np.array([a["predictions"][0]["index"] for a in pool.map(lambda u: service.post("/classify", u), clean)])


def run_robustness_benchmark(*, url: str, data: str | Path, patch: str | Path, model: str = "efficientnet_lite0",
                             methods: Sequence[str] = ("slgs", "lgs"), target: int | None = None,
                             lam: float | None = None, saliency: str | None = None, workers: int = 8,
                             limit: int | None = None, api_key: str | None = None, timeout: float = 120.0,
                             json_path: str | Path | None = None, thresholds_path: str | Path | None = None,
                             photos: Sequence[WholePhoto] = (), confident_at: float = CONFIDENT_AT) -> int:
    """Send the workload to the service at ``url`` for each method, print the tables and the checks,
    write ``json_path``; 0 when every check passes, else 1 (arguments as ``elgs bench robustness``)."""
    service = Service(url, model, api_key, timeout)
    info = service.model_info()
    size = info["input_size"]
    patch_path = Path(patch)
    patch_pixels, target, meta = _patch_and_target(patch_path, target)
    names, arrays, recorded = load_images(Path(data), size)
    names, arrays = (names[:limit], arrays[:limit]) if limit else (names, arrays)
    clean = [Upload(f"{name}.png", png_bytes(a)) for name, a in zip(names, arrays)]
    work = Workload(clean=clean, patched=[Upload(u.name, png_bytes(paste(a, patch_pixels))) for u, a in zip(clean, arrays)],
                    photos=list(photos), labels=_labels(service, names, clean, recorded, workers),
                    patch_name=patch_path.name, target=target, confident_at=confident_at)
    thresholds = None
    if thresholds_path:
        from elgs.thresholds import load_thresholds

        thresholds = load_thresholds(model, size, paths=(thresholds_path,))
        if thresholds is None:
            raise ValueError(f"{thresholds_path} has no thresholds for {model} at {size} px")
    params = {k: v for k, v in (("lambda", lam), ("saliency", saliency)) if v is not None}
    rows = {}
    for method in methods:
        method_params = {k: v for k, v in params.items() if k != "saliency" or method in ("slgs", "wlgs")}
        rows[method] = evaluate_method(service, method, work, workers=workers, params=method_params,
                                       thresholds=thresholds)
    print(f"{url}: {model} ({info['weights']}), {len(names)} images from {data}, patch {patch_path.name} "
          f"({patch_pixels.shape[0]} px -> {meta.get('target_label', target)}) at the test placement, "
          f"{len(work.photos)} whole photographs; {sum(r['requests'] for r in rows.values())} requests")
    print(format_rows(list(rows.values()), work.patch_name, confident_at))
    for name, row in rows.items():
        print(f"{name}: attack threshold {row['attack_threshold']} (decided by {row['decided_by']})"
              + (f", saliency {row['saliency_method']}" if row["saliency_method"] else ""))
    verdicts = checks(rows, work.patch_name)
    for text, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps({
            "url": url, "model": model, "data": str(data), "patch": str(patch_path), "target": target,
            "confident_at": confident_at, "labels": work.labels.tolist(),
            "photos": [{"name": p.name, "photo": p.photo, "format": p.format, "width": p.width, "height": p.height}
                       for p in work.photos],
            "rows": rows, "checks": [{"check": t, "pass": ok} for t, ok in verdicts]}, indent=2))
        print(f"written to {json_path}")
    return 0 if all(ok for _, ok in verdicts) else 1
