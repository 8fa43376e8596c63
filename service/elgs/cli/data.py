"""``elgs data samples|uploads``: offline image sets from scikit-image's photographs (attacks, calibration)."""

from __future__ import annotations

import argparse
import json

from elgs.cli._common import CommandError, load_model_or_fail, model_arguments, positive_int


def _data_samples(args: argparse.Namespace) -> int:
    from elgs.attacks.data import make_sample_set

    model = load_model_or_fail(args, input_size=args.image_size)
    try:
        report = make_sample_set(args.out, model, train=args.train, heldout=args.heldout, seed=args.seed,
                                 min_area=args.min_area, min_confidence=args.min_confidence, split=args.split)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(f"{report.train} training and {report.heldout} held-out crops ({report.classes} distinct "
          f"{model.name} classes) written to {report.root}/train and {report.root}/heldout")
    labels = json.loads((report.root / "train" / "labels.json").read_text())["labels"]
    counts: dict[str, int] = {}
    for entry in labels.values():
        counts[entry["label"]] = counts.get(entry["label"], 0) + 1
    common = sorted(counts.items(), key=lambda item: -item[1])[:5]
    print("most common training labels: " + ", ".join(f"{label} ({n})" for label, n in common))
    return 0


def _data_uploads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from elgs.attacks.data import WHOLE_PHOTO_VARIANTS, whole_photos

    variants = [v for v in WHOLE_PHOTO_VARIANTS if args.native or v.label != "native"]
    counts: dict[str, int] = {}
    for upload in whole_photos(variants=variants, jpeg_quality=args.jpeg_quality):
        folder = Path(args.out) / f"photos-{upload.format.lower()}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / upload.name).write_bytes(upload.data)
        counts[folder.name] = counts.get(folder.name, 0) + 1
    print(", ".join(f"{n} uploads in {Path(args.out) / name}" for name, n in counts.items())
          + f" ({', '.join(v.label for v in variants)})")
    return 0


def add_commands(subparsers) -> None:
    data = subparsers.add_parser("data", help="data sets for attacks")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    samples = data_sub.add_parser(
        "samples", help="build an offline image set from scikit-image's photographs",
        description="Random crops and flips of scikit-image's photographs, labelled by the model, split into "
                    "OUT/train and OUT/heldout (each with labels.json).",
    )
    samples.add_argument("--out", required=True, help="folder to write")
    model_arguments(samples, default="efficientnet_lite0", input_size=False)
    samples.add_argument("--image-size", type=positive_int, default=None, help="crop side (default: the model's)")
    samples.add_argument("--train", type=positive_int, default=200, help="training crops (default 200)")
    samples.add_argument("--heldout", type=int, default=100, help="held-out crops (default 100)")
    samples.add_argument("--split", default="crops", choices=["crops", "photos"],
                         help="crops: held-out crops of the same photos; photos: of disjoint photos (default crops)")
    samples.add_argument("--min-area", type=float, default=0.3, help="smallest crop as a fraction of the photo's area (default 0.3)")
    samples.add_argument("--min-confidence", type=float, default=0.3,
                         help="redraw crops whose top-1 probability is below this (default 0.3; 0 keeps all)")
    samples.add_argument("--seed", type=int, default=0, help="seeds the crops, flips and split (default 0)")
    samples.set_defaults(handler=_data_samples)
    uploads = data_sub.add_parser(
        "uploads", help="write whole photographs as users upload them (the calibration's photo kinds)",
        description="Every photograph of elgs.attacks.data.WHOLE_PHOTOS, re-framed (1024 and 320 px long side, "
                    "16:9 and 3:4 crops) and encoded as JPEG and PNG, into OUT/photos-jpeg and OUT/photos-png: "
                    "pass each folder to `elgs calibrate --data` so the false-positive rate is reported per format.",
    )
    uploads.add_argument("--out", required=True, help="folder to write")
    uploads.add_argument("--native", action="store_true",
                         help="also the photographs at their own size (left out by default: the held-out uploads "
                              "of `attack eval --whole-photos native` and `bench robustness`)")
    uploads.add_argument("--jpeg-quality", type=int, default=90, choices=range(1, 96), metavar="1-95",
                         help="Pillow's JPEG quality (default 90)")
    uploads.set_defaults(handler=_data_uploads)
