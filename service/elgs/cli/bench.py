"""``elgs bench WHAT``: the options here, the benchmarks in :mod:`elgs.bench` (one module each).

- ``defenses``: defence-op time over model-pass time per method (:mod:`elgs.bench.defenses`)
- ``service``: HTTP throughput and latency against the hardware's floor (:mod:`elgs.bench.service`)
- ``robustness``: the figures of ``attack eval`` through a running service (:mod:`elgs.bench.robustness`)
- ``flood``: a queue flood against a running service (:mod:`elgs.bench.flood`)
- ``placement``: where a model's torch ops should run, per fresh process (:mod:`elgs.bench.placement`)
- ``precision``: top-1 agreement of the autocast dtypes with float32 (:mod:`elgs.bench.precision`)
- ``estimators``: restore rate, clean kept and cost per saliency estimator (:mod:`elgs.bench.estimators`)
- ``saliency-probe``: where the saliency sits on patched images (:mod:`elgs.bench.saliency_probe`)
- ``through``: the cost of one training step through each defence (:mod:`elgs.bench.through_cost`)

The parsers are built without the ``bench`` extra (``elgs --help`` works on a lean install); the
handlers import :mod:`elgs.bench` when they run and, when httpx or matplotlib is missing, say
``pip install 'elgs[bench]'``. :func:`add_service_arguments` is shared with ``benchmarks/load.py``;
the other ``benchmarks/*.py`` call these commands.
"""

from __future__ import annotations

import argparse

from elgs.bench import CONCURRENCY_LEVELS, ESTIMATORS, PLACEMENTS
from elgs.cli._common import BENCH_EXTRA, CommandError, load_model_or_fail, positive_int

# The first paragraph of elgs.bench.service's docstring (tests/bench check that they agree).
SERVICE_SUMMARY = ("Service load benchmark (design.md, section 8): HTTP throughput and latency against the hardware's "
                   "floor.")


def require_bench_extra(what: str) -> None:
    """Raise CommandError naming the extra when httpx or matplotlib cannot be imported."""
    try:
        import httpx  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise CommandError(f"{what} needs httpx and matplotlib: {BENCH_EXTRA} ({error})") from None


def _bench_defenses(args: argparse.Namespace) -> int:
    try:
        from elgs.bench.defenses import DEFAULT_ESTIMATORS, run_defense_benchmark
    except ImportError as error:
        raise CommandError(f"cannot import the defence benchmark: {error} ({BENCH_EXTRA} installs what the "
                           "benchmarks need)") from None

    estimators = [] if args.saliency == ["none"] else (args.saliency or list(DEFAULT_ESTIMATORS))
    run_defense_benchmark(models=args.models.split(","), batch_size=args.batch_size, size=args.size,
                          repeats=args.repeats, device=args.device, json_path=args.json, estimators=estimators)
    return 0


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The service benchmark's options, shared by ``benchmarks/load.py`` and ``elgs bench service``."""
    parser.add_argument("--model", "--models", dest="model", default="efficientnet_lite0",
                        help="model the servers load (default efficientnet_lite0)")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    parser.add_argument("--method", default="slgs", help="defence to request (default slgs)")
    parser.add_argument("--compare", default="", metavar="METHODS",
                        help="comma list of other defences measured at the same levels on the same servers, each "
                             "right after --method's, with their req/s ratio (e.g. --method slgs --compare auto)")
    parser.add_argument("--saliency", default=None, metavar="SPEC",
                        help="?saliency= of the requests, e.g. gradient (default: the model's estimator); the floor's "
                             "gradient pass carries as many copies per image")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY_LEVELS)),
                        help="comma list of concurrency levels (default 1,2,4,8,16,32)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per level (default 8)")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting two")
    parser.add_argument("--api-key", default=None, help="default: the api_key setting ($ELGS_API_KEY)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="max_batch_size of the batching-on server (default: the server's)")
    parser.add_argument("--engine", dest="engine", action="store_true", default=False,
                        help="also measure the engine alone (with the defences) as a second line, interleaved "
                             "with HTTP windows at concurrency 8")
    parser.add_argument("--no-engine", dest="engine", action="store_false", help="skip the engine alone (default)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the model-alone floor (then no ratios)")
    parser.add_argument("--omp-wait-policy", default="",
                        help="OMP_WAIT_POLICY of servers and engine (default '': inherit this environment's, as a "
                             "user's server runs; PASSIVE helps on a machine busy with other work)")
    parser.add_argument("--ratio-rounds", type=int, default=3,
                        help="alternating engine / HTTP windows for the ratio at concurrency 8 (default 3)")
    parser.add_argument("--device", default=None, help="ELGS_DEVICE for servers and engine")
    parser.add_argument("--input-size", type=int, default=None, help="ELGS_INPUT_SIZE for servers and engine")
    parser.add_argument("--out", default="benchmarks/results", help="folder for service_load.json / .png")


def bench_service(args: argparse.Namespace) -> int:
    """Run the service benchmark from parsed :func:`add_service_arguments` options."""
    try:
        levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise CommandError(f"--concurrency must be a comma list of positive integers, got {args.concurrency!r}")
    require_bench_extra("the service benchmark")
    from elgs.bench.service import run_service_benchmark
    from elgs.settings import Settings

    api_key = args.api_key
    if api_key is None and (configured := Settings().api_key) is not None:
        api_key = configured.get_secret_value()
    run_service_benchmark(model=args.model, weights=args.weights, method=args.method, concurrency=levels,
                          duration_s=args.duration, url=args.url, api_key=api_key,
                          batched_max_batch_size=args.max_batch_size, engine=args.engine, out_dir=args.out,
                          device=args.device, input_size=args.input_size, ratio_rounds=args.ratio_rounds,
                          omp_wait_policy=args.omp_wait_policy or None, floor=args.floor, saliency=args.saliency,
                          compare=[m.strip() for m in args.compare.split(",") if m.strip()])
    return 0


def _bench_robustness(args: argparse.Namespace) -> int:
    from elgs.cli.attack import whole_photo_set

    require_bench_extra("the robustness benchmark")
    from elgs.bench.robustness import run_robustness_benchmark

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CommandError("--methods is empty; give e.g. slgs,lgs")
    if not 0 <= args.confident_at <= 1:
        raise CommandError(f"--confident-at must be in [0, 1], got {args.confident_at}")
    try:
        return run_robustness_benchmark(
            url=args.url, data=args.data, patch=args.patch, model=args.model, methods=methods, target=args.target,
            lam=args.lam, saliency=args.saliency, workers=args.workers, limit=args.limit, api_key=args.api_key,
            timeout=args.timeout, json_path=args.json, thresholds_path=args.thresholds,
            photos=list(whole_photo_set(args.whole_photos)), confident_at=args.confident_at)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise CommandError(str(error)) from None


def _add_robustness(bench_sub) -> None:
    from elgs.cli.attack import add_evaluation_arguments

    parser = bench_sub.add_parser(
        "robustness", help="clean kept, restored, final_predictions, AUROC, whole-photo flags through a running server",
        description="Clean and patched crops and whole photographs sent to a running service; the figures of "
                    "`elgs attack eval` from its answers, by confidence, with req/s per method.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running service")
    parser.add_argument("--data", required=True, help="held-out images (labels.json from `elgs data samples`)")
    parser.add_argument("--patch", required=True, help="patch PNG; its JSON sidecar gives the target")
    parser.add_argument("--target", type=int, default=None, help="target class index (default: the sidecar's)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--methods", default="slgs,lgs", help="comma list (default slgs,lgs)")
    parser.add_argument("--lambda", dest="lam", type=float, default=None, help="default: the model's")
    parser.add_argument("--saliency", default=None, help="?saliency= for slgs/wlgs (default: the model's)")
    parser.add_argument("--workers", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", default=None, help="write the rows and checks as JSON")
    parser.add_argument("--thresholds", default=None,
                        help="calibration file deciding 'attacked' afterwards where the service had no threshold")
    add_evaluation_arguments(parser)
    parser.set_defaults(handler=_bench_robustness)


def _model_options(parser: argparse.ArgumentParser, *, input_size: bool = True) -> None:
    """--model (any zoo name), --weights, --device and --input-size, read by :func:`load_model_or_fail`."""
    parser.add_argument("--model", default="efficientnet_lite0", help="zoo model (default efficientnet_lite0)")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                        help="'random' is for development only")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: $ELGS_DEVICE, else CUDA if present)")
    if input_size:
        parser.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")


def _image_tensors(root: str, model, limit: int | None):
    """(images (N, 3, S, S), labels (N,)) of an ``attack eval``-style folder, the first ``limit`` only."""
    from elgs.attacks.data import load_image_set, load_tensors

    try:
        images, labels = load_tensors(load_image_set(root, model))
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def _bench_flood(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from elgs.bench.flood import flood

    if args.requests < 1:
        raise CommandError(f"--requests must be >= 1, got {args.requests}")
    print(json.dumps(asyncio.run(flood(args.url, args.requests, args.path, args.probe_after_s)), indent=2))
    return 0


def _bench_placement(args: argparse.Namespace) -> int:
    from elgs.bench.placement import run_placements

    placements = [p.strip() for p in args.placements.split(",") if p.strip()]
    unknown = [p for p in placements if p not in PLACEMENTS]
    if unknown or not placements:
        raise CommandError(f"--placements: choose from {', '.join(PLACEMENTS)}, got {args.placements!r}")
    rows = run_placements(placements, model=args.model, repeats=args.repeats, weights=args.weights,
                          input_size=args.input_size)
    return 0 if len(rows) == len(placements) else 1


def _bench_precision(args: argparse.Namespace) -> int:
    from elgs.bench.precision import run_precision

    run_precision(args.model, [d.strip() for d in args.dtypes.split(",") if d.strip()], device=args.device,
                  weights=args.weights, input_size=args.input_size)
    return 0


def _bench_estimators(args: argparse.Namespace) -> int:
    from pathlib import Path

    from elgs.bench.estimators import load_patch, run_estimator_benchmark

    try:
        patch, target = load_patch(Path(args.patch))
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise CommandError(f"{args.patch}: {error}") from None
    model = load_model_or_fail(args)
    images, labels = _image_tensors(args.data, model, args.limit)
    run_estimator_benchmark(model, images, labels, patch, target, lam=args.lam, chunk=args.chunk,
                            estimators=[e for e in args.estimators.split(";") if e.strip()], out=Path(args.out))
    return 0


def _bench_saliency_probe(args: argparse.Namespace) -> int:
    from elgs.bench.saliency_probe import run_saliency_probe
    from elgs.images import image_to_tensor, open_image

    try:
        image = open_image(args.patch)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from None
    model = load_model_or_fail(args)
    images, _ = _image_tensors(args.data, model, args.limit)
    run_saliency_probe(model, images, image_to_tensor(image, image.width))
    return 0


def _bench_through(args: argparse.Namespace) -> int:
    from elgs.bench.through_cost import run_through_cost

    model = load_model_or_fail(args)
    images, labels = _image_tensors(args.data, model, args.batch_size)
    try:
        run_through_cost(model, images, labels, repeats=args.repeats, patch_size=args.patch_size)
    except ValueError as error:
        raise CommandError(str(error)) from None
    return 0


def _add_research_benchmarks(bench_sub) -> None:
    """flood, placement, precision, estimators, saliency-probe, through."""
    flood = bench_sub.add_parser("flood", help="a queue flood against a running server: statuses, 503 timing, a probe")
    flood.add_argument("--url", default="http://127.0.0.1:8000")
    flood.add_argument("--requests", type=int, default=600, help="requests sent at once (default 600)")
    flood.add_argument("--path", default="/defend/slgs", help="path and query (default /defend/slgs)")
    flood.add_argument("--probe-after-s", type=float, default=5.0, help="when to probe the full queue (default 5)")
    flood.set_defaults(handler=_bench_flood)

    placement = bench_sub.add_parser("placement", help="one /defend/slgs request per thread placement, "
                                     "each in a fresh process (main thread, worker thread, worker process)")
    _model_options(placement)
    placement.add_argument("--repeats", type=positive_int, default=15)
    placement.add_argument("--placements", default=",".join(PLACEMENTS), help="comma list (default: all)")
    placement.set_defaults(handler=_bench_placement)

    precision = bench_sub.add_parser("precision", help="top-1 agreement of ELGS_DTYPE=bfloat16|float16 with float32")
    _model_options(precision)
    precision.add_argument("--dtypes", default="bfloat16,float16", help="comma list (default bfloat16,float16)")
    precision.set_defaults(handler=_bench_precision)

    estimators = bench_sub.add_parser("estimators", help="restore rate, clean kept and pass-1 cost per saliency "
                                      "estimator and WLGS weighting")
    estimators.add_argument("data", help="held-out images, as attack eval --data")
    estimators.add_argument("patch", help="patch PNG (with its sidecar) or a training checkpoint .pt")
    _model_options(estimators)
    estimators.add_argument("--lam", type=float, default=3.5)
    estimators.add_argument("--limit", type=positive_int, default=None, help="first N images only")
    estimators.add_argument("--chunk", type=positive_int, default=8, help="images per saliency pass (default 8)")
    estimators.add_argument("--estimators", default=";".join(ESTIMATORS), help="specs separated by ';'")
    estimators.add_argument("--out", default="estimators.json", help="JSON written as rows finish")
    estimators.set_defaults(handler=_bench_estimators)

    probe = bench_sub.add_parser("saliency-probe", help="where the saliency sits on patched images, per loss")
    probe.add_argument("data", help="held-out images, as attack eval --data")
    probe.add_argument("patch", help="a square patch PNG")
    _model_options(probe)
    probe.add_argument("--limit", type=positive_int, default=48, help="first N images (default 48)")
    probe.set_defaults(handler=_bench_saliency_probe)

    through = bench_sub.add_parser("through", help="the cost of one attack-training step through each defence")
    through.add_argument("--data", required=True, help="training images, as attack train --data")
    _model_options(through)
    through.add_argument("--batch-size", type=positive_int, default=10)
    through.add_argument("--repeats", type=positive_int, default=3)
    through.add_argument("--patch-size", type=positive_int, default=64)
    through.set_defaults(handler=_bench_through)


def add_commands(subparsers) -> None:
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

    service = bench_sub.add_parser(
        "service", help="HTTP throughput and latency vs concurrency, batching on/off, engine ceiling",
        description=SERVICE_SUMMARY)
    add_service_arguments(service)
    service.set_defaults(handler=bench_service)
    _add_robustness(bench_sub)
    _add_research_benchmarks(bench_sub)
