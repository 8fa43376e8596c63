"""Core CLI commands: ``defend``, ``calibrate``, ``models list|fetch``, ``defenses``, ``bench defenses``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from elgs.cli import CommandError
from elgs.defenses import DEFENSES, ESTIMATORS, LAMBDA_RANGE, THRESHOLD_RANGE
from elgs.models import MODELS, WeightsUnavailableError


def _model_arguments(parser: argparse.ArgumentParser, default: str = "vgg16") -> None:
    parser.add_argument("--model", default=default, choices=list(MODELS), help=f"zoo model (default {default})")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                        help="'random' is for development only")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: $ELGS_DEVICE, else CUDA if present)")
    parser.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")


def zoo_options(device: str | None = None) -> dict:
    """``device`` (else ELGS_DEVICE), ELGS_WEIGHTS_DIR and ELGS_ALLOW_DOWNLOAD, read by :class:`Settings`
    (the one reader of the environment), as keyword arguments of :func:`elgs.models.load_model`."""
    from elgs.api.settings import Settings

    settings = Settings()
    return {"device": device or settings.device, "weights_dir": settings.weights_dir,
            "allow_download": settings.allow_download}


def load_model_or_fail(args: argparse.Namespace):
    """Load the model named by ``--model/--weights/--device/--input-size`` or raise CommandError."""
    from elgs.models import load_model

    try:
        return load_model(args.model, weights=args.weights, input_size=args.input_size, **zoo_options(args.device))
    except (WeightsUnavailableError, ValueError, KeyError) as error:
        raise CommandError(str(error)) from None


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


def _defend(args: argparse.Namespace) -> int:
    from elgs.engine import Engine, InvalidParameterError, Request, UnknownMethodError
    from elgs.images import ImageDecodeError, ImageTooLargeError, encode_png, image_to_tensor, open_image

    if args.method not in DEFENSES:
        raise CommandError(f"unknown method {args.method!r}; choose one of {', '.join(DEFENSES)}")
    try:
        image = open_image(args.image)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    except (ImageDecodeError, ImageTooLargeError) as error:
        raise CommandError(f"{args.image}: {error}") from None
    model = load_model_or_fail(args)
    engine = Engine(model)
    request = Request(image=image_to_tensor(image, model.input_size), task="defend", method=args.method,
                      lam=args.lam, threshold=args.threshold, saliency=args.saliency,
                      attack_threshold=args.attack_threshold)
    try:
        (result,) = engine.run([request])
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
    if args.out:
        Path(args.out).write_bytes(encode_png(result.image))
        print(f"defended image written to {args.out}")
    if args.mask_out:
        Path(args.mask_out).write_bytes(encode_png(result.mask))
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
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


def _verdict(result) -> str:
    """One line: the attack score, the threshold and which top-5 to use."""
    final = result.final_predictions[0].label if result.final_predictions else "?"
    if result.attacked is None:
        return (f"attack score {result.attack_score:.4f} (no calibrated threshold: run `elgs calibrate` or pass "
                f"--attack-threshold); final: the defended answer, {final}")
    verdict = "ATTACKED, final: the defended answer" if result.attacked else "clean, final: the original answer"
    return f"attack score {result.attack_score:.4f}, threshold {result.attack_threshold:.4f}: {verdict}, {final}"


def _calibrate(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from elgs.attacks.data import list_images
    from elgs.calibration import calibrate
    from elgs.images import ImageDecodeError, ImageTooLargeError, image_to_tensor, open_image
    from elgs.thresholds import user_calibration_path, write_calibration

    try:
        paths = list_images(args.data)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise CommandError(f"no images under {args.data}")
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
            yield torch.stack(batch)

    try:
        thresholds = calibrate(model, chunks(), fpr=args.fpr, methods=methods, lambdas=lambdas,
                               saliencies=args.saliency or (), data=str(args.data))
    except ValueError as error:
        raise CommandError(str(error)) from None
    out = write_calibration(args.out or user_calibration_path(), thresholds)
    print(f"{model.name}: {thresholds.images} clean images, false-positive rate {args.fpr:g}")
    for entry in thresholds.entries:
        lam = "" if entry.lam is None else f" lambda {entry.lam:g}"
        saliency = f" [{entry.saliency}]" if entry.saliency else ""
        print(f"  {entry.method:<9}{lam:<12} threshold {entry.threshold:.4f} (clean flagged "
              f"{entry.clean_flagged:.1%}){saliency}")
    print(f"written to {out}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from elgs.models import resolve_weights_file

    for spec in MODELS.values():
        if spec.embedded_weights is not None:
            status = "embedded"
        else:
            local = resolve_weights_file(spec, zoo_options()["weights_dir"])
            status = f"found at {local}" if local else f"missing ({spec.weights_file})"
        print(f"{spec.name:<20} input {spec.input_size:<4} lambda {spec.default_lambda:<4} weights {status}")
        print(f"{'':<20} {spec.summary}")
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    from elgs.models import get_model_spec
    from elgs.models.registry import load_state_dict

    for name in args.names:
        try:
            options = zoo_options()
            load_state_dict(get_model_spec(name), weights_dir=options["weights_dir"],
                            allow_download=options["allow_download"])
        except (WeightsUnavailableError, KeyError) as error:
            raise CommandError(str(error)) from None
        print(f"{name}: weights ready")
    return 0


def _defenses(args: argparse.Namespace) -> int:
    for defense in DEFENSES.values():
        extra = " (needs saliency: pass 1 with input gradient)" if defense.needs_saliency else ""
        print(f"{defense.name:<10} {defense.summary}{extra}")
    print("saliency estimators (--saliency / ?saliency= NAME[:key=value,...]):")
    for estimator in ESTIMATORS.values():
        parameters = ", ".join(f"{p.name}={str(p.default).lower() if isinstance(p.default, bool) else p.default}"
                               for p in estimator.parameters)
        print(f"  {estimator.name:<10} {estimator.summary}")
        print(f"  {'':<10} parameters (defaults): {parameters}")
    print(f"lambda in [{LAMBDA_RANGE[0]:g}, {LAMBDA_RANGE[1]:g}] (default per model), "
          f"threshold in [{THRESHOLD_RANGE[0]:g}, {THRESHOLD_RANGE[1]:g}] (default 0.2)")
    return 0


def _bench_defenses(args: argparse.Namespace) -> int:
    from elgs.bench.defenses import DEFAULT_ESTIMATORS, run_defense_benchmark

    estimators = [] if args.saliency == ["none"] else (args.saliency or list(DEFAULT_ESTIMATORS))
    run_defense_benchmark(models=args.models.split(","), batch_size=args.batch_size, size=args.size,
                          repeats=args.repeats, device=args.device, json_path=args.json, estimators=estimators)
    return 0


def add_commands(subparsers) -> None:
    defend = subparsers.add_parser(
        "defend", help="defend one image and print both top-5 lists",
        description="Classify IMAGE, apply a defence, classify the defended image; print both top-5 lists.",
    )
    defend.add_argument("image", metavar="IMAGE", help="image file, or skimage:NAME for a scikit-image photo")
    _model_arguments(defend)
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

    calibrate = subparsers.add_parser(
        "calibrate", help="calibrate the attack-score thresholds of a model on clean images",
        description="Run clean images through every method and lambda and store, per setting, the attack score "
                    "that at most FPR of them exceed. The service reads the file at start-up "
                    "($ELGS_CALIBRATION_FILE, default ~/.config/elgs/calibration.json).",
    )
    _model_arguments(calibrate, default="efficientnet_lite0")
    calibrate.add_argument("--data", required=True, help="folder of clean images (searched recursively)")
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

    models = subparsers.add_parser("models", help="list the zoo or fetch weights")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_sub.add_parser("list", help="zoo entries and where their weights are").set_defaults(handler=_models_list)
    fetch = models_sub.add_parser("fetch", help="download pretrained weights into torchvision's cache")
    fetch.add_argument("names", nargs="+", choices=list(MODELS), metavar="MODEL")
    fetch.set_defaults(handler=_models_fetch)

    subparsers.add_parser("defenses", help="list the defences and their parameters").set_defaults(handler=_defenses)

    bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bench_defenses = bench_sub.add_parser(
        "defenses", help="defence-op time over model-pass time per method, measured in one run")
    bench_defenses.add_argument("--models", default="efficientnet_lite0,vgg16:random",
                                help="comma list of MODEL or MODEL:random (default efficientnet_lite0,vgg16:random)")
    bench_defenses.add_argument("--batch-size", type=int, default=4)
    bench_defenses.add_argument("--size", type=int, default=224)
    bench_defenses.add_argument("--repeats", type=int, default=5)
    bench_defenses.add_argument("--device", default=None)
    bench_defenses.add_argument("--saliency", action="append", metavar="SPEC",
                                help="saliency estimator to time as /defend/slgs batches (repeatable; default: "
                                     "gradient, rectified, smoothgrad n=4 and n=8; 'none' skips these rows)")
    bench_defenses.add_argument("--json", help="write the results as JSON")
    bench_defenses.set_defaults(handler=_bench_defenses)

    from elgs.bench.service import add_bench_service

    add_bench_service(bench_sub)
