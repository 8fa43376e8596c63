"""``elgs calibrate``: the attack-score thresholds of a model on clean images (elgs.calibration)."""

from __future__ import annotations

import argparse
from pathlib import Path

from elgs.cli._common import (
    CommandError,
    calibration_file,
    check_output_file,
    load_model_or_fail,
    model_arguments,
    positive_int,
)
from elgs.defenses import DEFENSES, LAMBDA_RANGE
from elgs.models import MODELS


def _checked_arguments(args: argparse.Namespace) -> tuple[list[Path], list[str], list[str], list[float], Path]:
    """The images, their kinds (the folder each came from), methods, lambdas and calibration file of the arguments, every argument checked before the
    weights load.

    Raises:
        CommandError: the first bad argument, named.
    """
    from elgs.attacks.data import list_images
    from elgs.defenses import parse_saliency
    from elgs.thresholds import read_calibration, user_calibration_path

    if args.weights != "pretrained":
        raise CommandError("calibrating random weights is pointless: the service ignores thresholds for them")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in DEFENSES]
    if unknown:
        raise CommandError(f"unknown method {unknown[0]!r}; choose among {', '.join(DEFENSES)}")
    try:
        lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--lambdas must be numbers separated by commas, got {args.lambdas!r}") from None
    if any(not LAMBDA_RANGE[0] <= v <= LAMBDA_RANGE[1] for v in lambdas):
        raise CommandError(f"--lambdas must lie in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}], got {args.lambdas}")
    if not 0 <= args.fpr < 1:
        raise CommandError(f"--fpr must be in [0, 1), got {args.fpr}")
    if not 0 <= args.verdict_fpr < 1:
        raise CommandError(f"--verdict-fpr must be in [0, 1), got {args.verdict_fpr}")
    default_saliency = MODELS[args.model].default_saliency
    for spec in args.saliency or ():
        try:
            parse_saliency(spec, base=default_saliency)
        except ValueError as error:
            raise CommandError(f"--saliency {spec}: {error}") from None
    out = Path(args.out) if args.out else user_calibration_path(calibration_file())
    check_output_file("--out", out, make_folders=True)
    try:
        read_calibration(out)  # the models already there are kept: the file must be one
    except ValueError as error:
        raise CommandError(str(error)) from None
    paths: list[Path] = []
    kinds: list[str] = []
    for folder in args.data:
        try:
            found = list_images(folder)
        except FileNotFoundError as error:
            raise CommandError(str(error)) from None
        found = found[: args.limit] if args.limit else found
        if not found:
            raise CommandError(f"no images under {folder}")
        paths += found
        kinds += [Path(folder).name or str(folder)] * len(found)
    return paths, kinds, methods, lambdas, out


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from elgs.calibration import calibrate
    from elgs.images import ImageDecodeError, ImageTooLargeError, image_to_tensor, open_image
    from elgs.thresholds import write_calibration

    paths, kinds, methods, lambdas, out = _checked_arguments(args)
    model = load_model_or_fail(args)

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
        thresholds = calibrate(model, chunks(), fpr=args.fpr, verdict_fpr=args.verdict_fpr, methods=methods,
                               lambdas=lambdas,
                               saliencies=args.saliency or (), data=", ".join(str(f) for f in args.data))
    except ValueError as error:
        raise CommandError(str(error)) from None
    try:
        write_calibration(out, thresholds)
    except OSError as error:
        raise CommandError(f"--out {out}: cannot write: {error.strerror or error}") from None
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
                           help="folder of clean images (searched recursively); repeat it for several kinds of image "
                                "(e.g. crops, whole photos as PNG, as JPEG): the false-positive rate is reported per "
                                "folder; --limit applies to each")
    calibrate.add_argument("--fpr", type=float, default=0.05,
                           help="share of clean images whose score may exceed the threshold (0.05)")
    calibrate.add_argument("--verdict-fpr", type=float, default=0.01,
                           help="share of clean images the full verdict (changed top-1, score, removal check) may "
                                "call attacked; the threshold rises until it holds (0.01)")
    calibrate.add_argument("--methods", default="lgs,slgs,wlgs,jpeg,median,gaussian",
                           help="comma list of methods (default lgs,slgs,wlgs,jpeg,median,gaussian)")
    calibrate.add_argument("--lambdas", default="2.3,2.7,3.5",
                           help="comma list of lambdas, the model's default is always added (2.3,2.7,3.5)")
    calibrate.add_argument("--saliency", action="append", metavar="SPEC",
                           help="also calibrate SLGS/WLGS with this estimator (repeatable); the model's default "
                                "estimator is always calibrated")
    calibrate.add_argument("--batch-size", type=positive_int, default=8, help="images per model call (8)")
    calibrate.add_argument("--limit", type=positive_int, default=None, help="use only the first N images")
    calibrate.add_argument("--out", default=None, help="calibration file to write (default: where the service reads)")
    calibrate.set_defaults(handler=_calibrate)
