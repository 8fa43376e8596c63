"""``elgs attack train|eval``: train adversarial patches and evaluate the defences against them."""

from __future__ import annotations

import argparse
from pathlib import Path

from elgs.cli._common import BENCH_EXTRA, CommandError, load_model_or_fail, model_arguments, positive_int
from elgs.attacks.through import THROUGH_METHODS
from elgs.defenses import DEFAULT_THRESHOLD, DEFENSES

DEFAULT_METHODS = "none,lgs,slgs,wlgs,jpeg,median,gaussian"
DEFAULT_LAMBDAS = "2.3,2.7,3.5"


def _load_data(root: str, model, image_size: int):
    from elgs.attacks.data import load_image_set

    try:
        return load_image_set(root, model, image_size)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None


def _training_data(dataset, in_memory_limit: int):
    """Small sets are decoded once and kept in memory; large ones (ImageNet) stream from disk."""
    from elgs.attacks.data import load_tensors

    if len(dataset) > in_memory_limit:
        return dataset
    try:
        return load_tensors(dataset)
    except (FileNotFoundError, ValueError) as error:  # e.g. an undecodable image in the folder
        raise CommandError(str(error)) from None


def _attack_train(args: argparse.Namespace) -> int:
    from elgs.attacks.data import resolve_target
    from elgs.attacks.train import AttackConfig, save_patch, train_patch

    model = load_model_or_fail(args, input_size=args.image_size)
    try:
        target = resolve_target(args.target, model.labels)
        config = AttackConfig(
            attack=args.attack, target=target, patch_size=args.patch_size, image_size=model.input_size,
            placement=args.placement, epochs=args.epochs, batches_per_epoch=args.batches_per_epoch,
            batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
            parametrization=args.parametrization, through=args.through, through_lambda=args.through_lambda,
            through_saliency=args.through_saliency,
            threshold=args.threshold, seed=args.seed,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    if args.init is not None:
        from elgs.images import open_image

        try:
            open_image(args.init)  # fail now, not after the data set is loaded
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"--init: {error}") from None
    dataset = _load_data(args.data, model, model.input_size)
    data = _training_data(dataset, args.in_memory_limit)
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_suffix(".ckpt.pt")
    print(f"{config.attack} patch {config.patch_size}px -> {model.labels[target]!r} ({target}) on {model.name} "
          f"({model.weights}, {model.device}); {len(dataset)} images ({dataset.layout}) at "
          f"{model.input_size}px; {config.optimizer} lr {config.lr:g} ({config.parametrization}), "
          f"{config.epochs} x {config.batches_per_epoch} x {config.batch_size}"
          + (f"; through {config.through} lambda {config.through_lambda:g}" if config.through else "")
          + (f", saliency {config.through_saliency}" if config.through_saliency else ""))
    try:
        result = train_patch(model, data, config, init=args.init, checkpoint=checkpoint, resume=args.resume,
                             progress=not args.no_progress, workers=args.workers)
    except ValueError as error:
        raise CommandError(str(error)) from None
    sidecar = save_patch(result, out, model, extra={"data": str(args.data), "images": len(dataset)})
    print(f"final targeted success on the training images: {result.final_success_rate:.1%} "
          f"({result.seconds:.0f} s)")
    print(f"patch written to {out}, details to {sidecar}, checkpoint {checkpoint}")
    return 0


def _parse_list(text: str, kind, what: str) -> list:
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"--{what} must be a comma-separated list, got {text!r}") from None


WHOLE_PHOTO_SETS = ("all", "native", "none")


def whole_photo_set(name: str):
    """The whole photographs of ``--whole-photos``: ``all`` (every size, aspect ratio and format of
    :func:`elgs.attacks.data.whole_photos`), ``native`` (native size, JPEG and PNG) or ``none``."""
    from elgs.attacks.data import PhotoVariant, whole_photos

    if name == "none":
        return []
    return whole_photos() if name == "all" else whole_photos(variants=[PhotoVariant("native")])


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """``--whole-photos`` and ``--confident-at``, shared by ``attack eval`` and ``bench robustness``."""
    parser.add_argument("--whole-photos", default="all", choices=WHOLE_PHOTO_SETS,
                        help="whole scikit-image photographs uploaded as they are, for the false-positive rate of "
                             "'attacked': all (22 photos x 5 sizes/aspect ratios x JPEG/PNG), native (22 x JPEG/PNG) "
                             "or none (default all)")
    parser.add_argument("--confident-at", type=float, default=0.5,
                        help="clean top-1 probability from which an image counts as confident (default 0.5)")


def _attack_eval(args: argparse.Namespace) -> int:
    from elgs.attacks.data import resolve_target
    from elgs.attacks.evaluate import PatchSpec, evaluate, format_table, plot_accuracy, write_report

    methods = [method.strip() for method in _parse_list(args.methods, str, "methods")]
    if not methods:
        raise CommandError("--methods is empty; give e.g. none,lgs,slgs")
    unknown = [m for m in methods if m not in DEFENSES]
    if unknown:
        raise CommandError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(DEFENSES)}")
    lambdas = _parse_list(args.lambdas, float, "lambdas")
    if not lambdas and any(DEFENSES[m].uses_lambda for m in methods):
        raise CommandError("--lambdas is empty; give e.g. 2.3,2.7,3.5")
    try:
        patches = [PatchSpec.load(path, shape=args.shape, target=args.target) for path in args.patch]
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    model_name = args.model or patches[0].model or "efficientnet_lite0"
    image_size = args.image_size or patches[0].image_size
    model = load_model_or_fail(args, name=model_name, input_size=image_size)
    for spec in patches:
        if spec.target is None:
            raise CommandError(f"{spec.path}: no JSON sidecar names the target; pass --target")
        if isinstance(spec.target, str):
            try:
                spec.target = resolve_target(spec.target, model.labels)
            except ValueError as error:
                raise CommandError(str(error)) from None
    dataset = _load_data(args.data, model, model.input_size)
    try:
        report = evaluate(model, dataset, patches, methods=methods, lambdas=lambdas, placement=args.placement,
                          batch_size=args.batch_size, limit=args.limit, seed=args.seed, threshold=args.threshold,
                          saliency=args.saliency, attack_threshold=args.attack_threshold,
                          progress=not args.no_progress, workers=args.workers,
                          photos=whole_photo_set(args.whole_photos), confident_at=args.confident_at)
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(format_table(report))
    if args.json:
        write_report(report, args.json)
        print(f"results written to {args.json}")
    if args.plot:
        try:
            plot_accuracy(report, args.plot)
        except ImportError as error:  # matplotlib comes with the bench extra; the numbers are out already
            if not (error.name or "").startswith("matplotlib"):
                raise
            print(f"no plot: {args.plot} needs matplotlib, {BENCH_EXTRA}")
        else:
            print(f"plot written to {args.plot}")
    return 0


def add_commands(subparsers) -> None:
    attack = subparsers.add_parser("attack", help="train adversarial patches and evaluate defences against them")
    attack_sub = attack.add_subparsers(dest="attack_command", metavar="ACTION", required=True)

    train = attack_sub.add_parser(
        "train", help="train a universal targeted patch (LaVAN or Adversarial Patch)",
        description="Train a targeted patch. Defaults are the paper's protocol (SGD momentum, lr 1 -> 0.1 -> "
                    "0.01 at 80%/90% of the epochs, 200 epochs of 50 batches of 20). On a CPU use e.g. "
                    "--optimizer adam --epochs 5 --batches-per-epoch 25 (see docs/attacks.md).",
    )
    train.add_argument("--attack", default="lavan", choices=["lavan", "patch"],
                       help="lavan: square, z_target - z_source; patch: circle, EoT, cross entropy (default lavan)")
    model_arguments(train, default="efficientnet_lite0", input_size=False)
    train.add_argument("--target", required=True, help="target class: index or ImageNet class name (e.g. toaster)")
    train.add_argument("--data", required=True, help="ImageNet-layout folder or a folder of images")
    train.add_argument("--out", default="patch.png", help="patch PNG; the JSON sidecar goes beside it (default patch.png)")
    train.add_argument("--patch-size", type=positive_int, default=52, help="patch side in pixels (default 52)")
    train.add_argument("--image-size", type=positive_int, default=None,
                       help="image side (default: the model's; the paper: 400)")
    train.add_argument("--placement", default="fixed", choices=["fixed", "random"],
                       help="fixed: top-right, 10 px in (the test placement); random: anywhere (default fixed)")
    train.add_argument("--epochs", type=positive_int, default=200, help="epochs (default 200, as the paper)")
    train.add_argument("--batches-per-epoch", type=positive_int, default=50, help="batches per epoch (default 50)")
    train.add_argument("--batch-size", type=positive_int, default=20, help="images per batch (default 20)")
    train.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"],
                       help="sgd: momentum with the paper's schedule; adam: constant lr (default sgd)")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: 1 for sgd, 0.1 for adam)")
    train.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    train.add_argument("--parametrization", default=None, choices=["clamp", "sigmoid"],
                       help="patch = clamp(p, 0, 1) or sigmoid(w) (default: clamp for sgd, sigmoid for adam)")
    train.add_argument("--through", default=None, choices=list(THROUGH_METHODS),
                       help="train through this defence (white-box, paper Eq. 13); auto: the original and the "
                            "LGS-screen views together, so that the cascade's screen sees no change")
    train.add_argument("--through-lambda", type=float, default=3.5, help="lambda of --through (default 3.5)")
    train.add_argument("--through-saliency", default=None,
                       help="saliency estimator of --through slgs/wlgs (default: the model's own, as the service)")
    train.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"block threshold of --through (default {DEFAULT_THRESHOLD:g})")
    train.add_argument("--init", default=None, help="initialise the patch from this image (or skimage:NAME)")
    train.add_argument("--seed", type=int, default=0,
                       help="seeds the initial patch, image order and placements (default 0)")
    train.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT with .ckpt.pt)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint if it exists")
    train.add_argument("--workers", type=int, default=2, help="data loader workers for large on-disk sets (default 2)")
    train.add_argument("--in-memory-limit", type=int, default=5000,
                       help="sets up to this many images are decoded once and kept in memory (default 5000)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_attack_train)

    evaluate = attack_sub.add_parser(
        "eval", help="accuracy, attack success and SSIM per defence and lambda (the paper's Table 1)",
        description="Evaluate patches against defences through the engine; prints the paper's Table 1 layout.",
    )
    evaluate.add_argument("--data", required=True, help="ImageNet-layout folder or a folder of images")
    evaluate.add_argument("--patch", required=True, nargs="+", help="patch PNG(s); their JSON sidecars give the target")
    model_arguments(evaluate, default=None, input_size=False)
    evaluate.add_argument("--image-size", type=positive_int, default=None, help="image side (default: the patch's)")
    evaluate.add_argument("--target", default=None, help="target class, when a patch has no sidecar")
    evaluate.add_argument("--shape", default=None, choices=["square", "circle"], help="patch shape (default: sidecar's)")
    evaluate.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default {DEFAULT_METHODS})")
    evaluate.add_argument("--lambdas", default=DEFAULT_LAMBDAS, help=f"comma list (default {DEFAULT_LAMBDAS})")
    evaluate.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                          help=f"block threshold (default {DEFAULT_THRESHOLD:g})")
    evaluate.add_argument("--placement", default="fixed", choices=["fixed", "random"],
                          help="fixed: top-right, 10 px in (the paper's test); random: seeded positions")
    evaluate.add_argument("--saliency", default=None,
                          help="saliency estimator of SLGS/WLGS, e.g. gradient or smoothgrad:n=4,sigma=0.2,rectify=true "
                               "(default: the model's own, as the service)")
    evaluate.add_argument("--attack-threshold", type=float, default=None,
                          help="attack-score threshold in [0, 2] for every row (default: the model's calibrated ones)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="requests per engine batch (default 16)")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N images only")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds random placements")
    evaluate.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    add_evaluation_arguments(evaluate)
    evaluate.add_argument("--json", default=None, help="write all numbers as JSON")
    evaluate.add_argument("--plot", default=None, help="write accuracy vs lambda (PNG)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(handler=_attack_eval)
