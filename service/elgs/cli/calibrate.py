"""``elgs calibrate``: the attack-score thresholds of a model on clean images (elgs.calibration)."""

from __future__ import annotations

import argparse
from pathlib import Path

from elgs.cli._common import calibration_file, CommandError, load_model_or_fail, model_arguments
from elgs.defenses import DEFENSES, LAMBDA_RANGE


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from elgs.attacks.data import list_images
    from elgs.calibration import calibrate
    from elgs.images import ImageDecodeError, ImageTooLargeError, image_to_tensor, open_image
    from elgs.thresholds import user_calibration_path, write_calibration

    folders = args.data
    paths: list = []
    kinds: list[str] = []
    for folder in folders:
        try:
            found = list_images(folder)
        except FileNotFoundError as error:
            raise CommandError(str(error)) from None
        if args.limit:
            found = found[: args.limit]
        if not found:
            raise CommandError(f"no images under {folder}")
        paths += found
        kinds += [Path(folder).name or str(folder)] * len(found)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEFENSES]
    if unknown:
        raise CommandError(f"unknown method {unknown[0]!r}; choose among {', '.join(DEFENSES)}")
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--lambdas must be numbers separated by commas, got {args.lambdas!r}") from None
    if not 0 <= args.fpr < 1:
        raise CommandError(f"--fpr must be in [0, 1), got {args.fpr}")
    if any(not LAMBDA_RANGE[0] <= v <= LAMBDA_RANGE[1] for v in lambdas):
        raise CommandError(f"--lambdas must lie in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}], got {args.lambdas}")
    model = load_model_or_fail(args)
    if model.weights != "pretrained":
        raise CommandError("calibrating random weights is pointless: the service ignores thresholds for them")

    def chunks():
        for start in tqdm(range(0, len(paths), args.batch_size), desc="calibrating", unit="batch"):
            batch = []
            for path in paths[start : start + args.batch_size]:
                try:
                    batch.append(image_to_tensor(open_image(path), model.input_size))
                except (ImageDecodeError, ImageTooLargeError) as error:
                    raise CommandError(f"{path}: {error}") from None
            yield torch.stack(batch), kinds[start : start + args.batch_size]

    try:
        thresholds = calibrate(model, chunks(), fpr=args.fpr, methods=methods, lambdas=lambdas,
                               saliencies=args.saliency or (), data=", ".join(str(f) for f in folders))
    except ValueError as error:
        raise CommandError(str(error)) from None
    out = write_calibration(args.out or user_calibration_path(calibration_file()), thresholds)
    print(f"{model.name}: {thresholds.images} clean images, false-positive rate {args.fpr:g}")
    for entry in thresholds.entries:
        lam = "" if entry.lam is None else f" lambda {entry.lam:g}"
        saliency = f" [{entry.saliency}]" if entry.saliency else ""
        by_kind = ", ".join(f"{kind} {share:.1%}" for kind, share in (entry.false_positive_by_kind or {}).items())
        print(f"  {entry.method:<9}{lam:<12} threshold {entry.threshold:.4f} (score above it: {entry.clean_flagged:.1%}"
              f"; false positives: {entry.false_positive_rate:.1%}, {by_kind}){saliency}")
    print(f"written to {out}")
    return 0


def add_commands(subparsers) -> None:
    calibrate = subparsers.add_parser(
        "calibrate", help="calibrate the attack-score thresholds of a model on clean images",
        description="Run clean images through every method and lambda and store, per setting, the attack score "
                    "that at most FPR of them exceed. The service reads the file at start-up "
                    "($ELGS_CALIBRATION_FILE, default ~/.config/elgs/calibration.json).",
    )
    model_arguments(calibrate, default="efficientnet_lite0")
    calibrate.add_argument("--data", required=True, action="append",
                           help="folder of clean images (searched recursively); repeat for several kinds of image "
                                "(e.g. crops, whole photos as PNG, as JPEG): the false-positive rate is reported "
                                "per folder")
    calibrate.add_argument("--fpr", type=float, default=0.05, help="false-positive rate on clean images (0.05)")
    calibrate.add_argument("--methods", default="lgs,slgs,wlgs,jpeg,median,gaussian",
                           help="comma list of methods (default lgs,slgs,wlgs,jpeg,median,gaussian)")
    calibrate.add_argument("--lambdas", default="2.3,2.7,3.5",
                           help="comma list of lambdas, the model's default is always added (2.3,2.7,3.5)")
    calibrate.add_argument("--saliency", action="append", metavar="SPEC",
                           help="also calibrate SLGS/WLGS with this estimator (repeatable); the model's default "
                                "estimator is always calibrated")
    calibrate.add_argument("--batch-size", type=int, default=8)
    calibrate.add_argument("--limit", type=int, default=None, help="use only the first N images")
    calibrate.add_argument("--out", default=None, help="calibration file to write (default: where the service reads)")
    calibrate.set_defaults(handler=_calibrate)
