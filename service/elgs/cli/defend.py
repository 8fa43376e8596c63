"""``elgs defend IMAGE``: classify one image, defend it, classify the defended image."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from elgs.cli._common import (
    CommandError,
    calibration_file,
    check_output_file,
    load_model_or_fail,
    model_arguments,
    write_output_file,
)
from elgs.defenses import DEFENSES, LAMBDA_RANGE
from elgs.models import MODELS


def _format_predictions(title_left: str, left, title_right: str, right) -> str:
    width = 34
    lines = [f"   {title_left:<{width}}  {title_right}"]
    for rank in range(max(len(left), len(right or []))):
        cells = []
        for column in (left, right):
            if column and rank < len(column):
                p = column[rank]
                cells.append(f"{p.label[:24]:<24} {p.score:8.4f}")
            else:
                cells.append("")
        lines.append(f"{rank + 1}. {cells[0]:<{width}}  {cells[1]}")
    return "\n".join(lines)


def _checked_request(args: argparse.Namespace):
    """The defend request of the arguments, checked against the model's zoo entry, and the output files
    checked writable: every argument error comes out before the weights load.

    Raises:
        CommandError: an unknown method, a parameter out of range, a bad saliency spec, an output file
            that cannot be written.
    """
    from elgs.engine import InvalidParameterError, ModelDefaults, Request, UnknownMethodError, resolve_request

    if args.method not in DEFENSES:
        raise CommandError(f"unknown method {args.method!r}; choose one of {', '.join(DEFENSES)}")
    request = Request(image=None, task="defend", method=args.method, lam=args.lam, threshold=args.threshold,
                      saliency=args.saliency, attack_threshold=args.attack_threshold)
    try:
        resolve_request(request, ModelDefaults.of(MODELS[args.model].describe()))
    except (InvalidParameterError, UnknownMethodError) as error:
        raise CommandError(str(error)) from None
    for option, path in (("--out", args.out), ("--mask-out", args.mask_out), ("--json", args.json)):
        check_output_file(option, path)
    return request


def _defend(args: argparse.Namespace) -> int:
    from elgs.engine import Engine, InvalidParameterError, UnknownMethodError
    from elgs.images import ImageDecodeError, ImageTooLargeError, image_to_tensor, open_image

    request = _checked_request(args)
    try:
        image = open_image(args.image)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    except (ImageDecodeError, ImageTooLargeError) as error:
        raise CommandError(f"{args.image}: {error}") from None
    model = load_model_or_fail(args)
    request = replace(request, image=image_to_tensor(image, model.input_size))
    try:
        (result,) = Engine(model, calibration_file=calibration_file()).run([request])
    except (InvalidParameterError, UnknownMethodError) as error:
        raise CommandError(str(error)) from None
    parameters = ", ".join(f"{k} {v:g}" for k, v in (("lambda", result.lam), ("threshold", result.threshold))
                           if v is not None)
    print(f"model {model.name} ({model.weights} weights, {model.device}), input {model.input_size}x{model.input_size}")
    print(f"method {args.method}" + (f" ({parameters})" if parameters else ""))
    if result.saliency_method:
        print(f"saliency {result.saliency_method}")
    print(_format_predictions("original", result.predictions, f"defended ({args.method})",
                              result.defended_predictions))
    print(_verdict(result))
    _write_outputs(args, model, result)
    return 0


def _write_outputs(args: argparse.Namespace, model, result) -> None:
    """The files of ``--out``, ``--mask-out`` and ``--json`` that were asked for."""
    from elgs.images import encode_png

    if args.out:
        write_output_file("--out", args.out, encode_png(result.image))
        print(f"defended image written to {args.out}")
    if args.mask_out:
        write_output_file("--mask-out", args.mask_out, encode_png(result.mask))
        print(f"mask written to {args.mask_out}")
    if args.json:
        payload = {
            "model": model.name, "weights": model.weights, "method": args.method,
            "lambda": result.lam, "threshold": result.threshold,
            "saliency": result.saliency_method,
            "original_predictions": [p.__dict__ for p in result.predictions],
            "predictions": [p.__dict__ for p in result.defended_predictions],
            "attack_score": result.attack_score, "attack_threshold": result.attack_threshold,
            "attacked": result.attacked, "final_predictions": [p.__dict__ for p in result.final_predictions],
            "removal_top1": result.removal_prediction.__dict__ if result.removal_prediction else None,
            "removal_score": result.removal_score, "removal_threshold": result.removal_threshold,
            "path": result.path,
            "stages": [{"method": s.method, "lambda": s.lam, "attack_score": s.attack_score,
                        "attack_threshold": s.attack_threshold, "flagged": s.flagged,
                        "top1": s.predictions[0].__dict__} for s in result.stages],
        }
        write_output_file("--json", args.json, json.dumps(payload, indent=2))


def _verdict(result) -> str:
    """The attack score, the threshold and which top-5 to use (a cascade: first the stages it ran)."""
    lines = []
    if result.path is not None:
        for stage in result.stages:
            threshold = "no threshold" if stage.attack_threshold is None else f"threshold {stage.attack_threshold:.4f}"
            outcome = {True: "flagged", False: "passed", None: "undecided"}[stage.flagged]
            lines.append(f"{stage.method}: score {stage.attack_score:.4f} ({threshold}), "
                         f"top-1 {stage.predictions[0].label}, {outcome}")
        lines.append(f"path: {result.path}")
    return "\n".join([*lines, _final_line(result)])


def _final_line(result) -> str:
    final = result.final_predictions[0].label if result.final_predictions else "?"
    if result.attacked is None:
        return (f"attack score {result.attack_score:.4f} (no calibrated threshold: run `elgs calibrate` or pass "
                f"--attack-threshold); final: the defended answer, {final}")
    answered_by = "the answer with the suspect removed" if result.removal_prediction else "the defended answer"
    verdict = f"ATTACKED, final: {answered_by}" if result.attacked else "clean, final: the original answer"
    threshold = "no threshold" if result.attack_threshold is None else f"threshold {result.attack_threshold:.4f}"
    changed = "" if result.attack_threshold is not None else " (the defence kept the top-1)"
    removal = ""
    if result.removal_score is not None:
        removal_threshold = ("no threshold" if result.removal_threshold is None
                             else f"threshold {result.removal_threshold:.4f}")
        removal = (f"; removal view score {result.removal_score:.4f} ({removal_threshold}), "
                   f"top-1 {result.removal_prediction.label}")
    return f"attack score {result.attack_score:.4f}, {threshold}{changed}{removal}: {verdict}, {final}"


def add_commands(subparsers) -> None:
    defend = subparsers.add_parser(
        "defend", help="defend one image and print both top-5 lists",
        description="Classify IMAGE, apply a defence, classify the defended image; print both top-5 lists.",
    )
    defend.add_argument("image", metavar="IMAGE", help="image file, or skimage:NAME for a scikit-image photo")
    model_arguments(defend, default="vgg16")
    defend.add_argument("--method", default="slgs", help=f"one of {', '.join(DEFENSES)} (default slgs)")
    defend.add_argument("--lambda", dest="lam", type=float, default=None,
                        help=f"smoothing factor in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}] (default: the model's)")
    defend.add_argument("--threshold", type=float, default=None, help="block threshold in [0, 1] (default 0.2)")
    defend.add_argument("--saliency", default=None, metavar="SPEC",
                        help="saliency estimator for slgs/wlgs, NAME[:key=value,...], e.g. "
                             "smoothgrad:n=4,sigma=0.2,rectify=true (default: the model's; see `elgs defenses`)")
    defend.add_argument("--attack-threshold", type=float, default=None,
                        help="attack-score threshold in [0, 2] (default: the model's calibrated one)")
    defend.add_argument("--out", help="write the defended image (PNG)")
    defend.add_argument("--mask-out", help="write the applied mask (8-bit PNG)")
    defend.add_argument("--json", help="write both top-5 lists, the attack score and the verdict as JSON")
    defend.set_defaults(handler=_defend)
