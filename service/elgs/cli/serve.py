"""``elgs serve``: run the HTTP service with uvicorn, or on Ray Serve with ``--ray``.

Its options override :class:`elgs.api.Settings` (``ELGS_*``), so ``--weights``/``--device`` default to
the settings rather than coming from :func:`elgs.cli._common.model_arguments`.
"""

from __future__ import annotations

import argparse

from elgs.cli._common import CommandError


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="run the HTTP service (uvicorn)",
        description="Serve POST /classify, /defend/{method}, /saliency and the web page at /. Options not given "
                    "here come from the ELGS_* environment (ELGS_API_KEY, ELGS_MAX_UPLOAD_MB, ...).")
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo models, the first is the default (default: $ELGS_MODELS, "
                             "else vgg16,inception_v3)")
    parser.add_argument("--host", default=None, help="address to bind (default: $ELGS_HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $ELGS_PORT, else 8000)")
    parser.add_argument("--weights", choices=["pretrained", "random"], default=None,
                        help="'random' is for development only (default: pretrained)")
    parser.add_argument("--weights-dir", default=None, help="directory with local weight files ($ELGS_WEIGHTS_DIR)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    parser.add_argument("--input-size", type=int, default=None, help="square input side (default: per model)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="requests per batch (default: 32 GPU, 4 CPU)")
    parser.add_argument("--max-batch-rows", type=int, default=None,
                        help="pass-1 rows per batch, SmoothGrad's n copies counting each ($ELGS_MAX_BATCH_ROWS, "
                             "default: 8 CPU, 8 x max-batch-size GPU)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="batch window after its first request (5)")
    parser.add_argument("--max-queue", type=int, default=None, help="queued requests per model before 503 (256)")
    parser.add_argument("--request-timeout-s", type=float, default=None, help="per-request deadline before 504 (30)")
    parser.add_argument("--max-connections", type=int, default=None,
                        help="concurrent connections before uvicorn answers 503 ($ELGS_MAX_CONNECTIONS, 1000)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of each model's compute thread ($ELGS_TORCH_THREADS, default: the cores "
                             "this process may use)")
    ray = parser.add_argument_group("Ray Serve (pip install 'elgs[ray]'; docs/deploy.md)")
    ray.add_argument("--ray", action="store_true",
                     help="serve on Ray Serve: an ingress deployment and one deployment per model")
    ray.add_argument("--replicas", type=int, default=1, help="replicas of each model deployment (1)")
    ray.add_argument("--ingress-replicas", type=int, default=1, help="replicas of the HTTP ingress (1)")
    ray.add_argument("--num-gpus", type=float, default=None,
                     help="GPUs per model replica (default: 1 when this machine has CUDA, else 0)")
    ray.add_argument("--num-cpus", type=float, default=None,
                     help="Ray CPUs per model replica (default: 1, less when the replicas would not fit the "
                          "Ray instance this command starts)")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster ('auto' for the local one started by 'ray start'); "
                          "default: start a Ray instance for this command")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # The models load and run in their compute threads; no torch op in the main thread (issue 8).
    parser.set_defaults(handler=_serve, torch_in_main_thread=False)


def check_loadable(settings) -> None:
    """Fail fast, without loading, on what would stop the lifespan loading ``settings.models``.

    Raises:
        KeyError: an unknown model name.
        WeightsUnavailableError: pretrained weights are neither local nor downloadable.
    """
    from elgs.models import WeightsUnavailableError, get_model_spec
    from elgs.models.registry import _missing_weights_message, resolve_weights_file

    for name in settings.models:
        spec = get_model_spec(name)
        if settings.weights != "pretrained" or spec.embedded_weights is not None:
            continue
        if resolve_weights_file(spec, settings.weights_dir) is None and (
                not settings.allow_download or spec.weights_url is None):
            raise WeightsUnavailableError(_missing_weights_message(spec, "no local file and downloads are off"))


def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from elgs.api import create_app
    from elgs.api.middleware import CONNECTION_HEADROOM
    from elgs.models import WeightsUnavailableError
    from elgs.settings import read_settings

    overrides = {field: getattr(args, field) for field in (
        "models", "host", "port", "weights", "weights_dir", "device", "input_size", "max_batch_size", "max_batch_rows",
        "max_wait_ms", "max_queue", "request_timeout_s", "max_connections", "torch_threads") if getattr(args, field) is not None}
    try:
        settings = read_settings(**overrides)
    except ValueError as error:
        raise CommandError(str(error)) from None
    # Checked here so a missing weights file is a one-line error; the lifespan loads each model in the
    # thread that will run it (a failed download there stops the server with "cannot start: ...").
    try:
        check_loadable(settings)
    except (WeightsUnavailableError, KeyError, ValueError) as error:
        raise CommandError(str(error.args[0]) if isinstance(error, KeyError) else str(error)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)-9s %(name)s: %(message)s")
    if args.ray:
        return _serve_on_ray(settings, args)
    app = create_app(settings)
    print(f"elgs: serving {', '.join(settings.models)} on http://{settings.host}:{settings.port} "
          f"(web page at /, API docs at /docs)", flush=True)
    # The app answers 503 (JSON, request id) over max_connections requests in progress; uvicorn's
    # limit_concurrency bounds open connections (idle and slow ones included) a little above it.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, workers=1,
                limit_concurrency=settings.max_connections + CONNECTION_HEADROOM)
    return 0


def _serve_on_ray(settings, args: argparse.Namespace) -> int:
    """``elgs serve --ray``: the same app on Ray Serve (elgs.api.ray), until Ctrl-C."""
    try:
        from elgs.api.ray import RayOptions, local_cpu_share, serve_forever
    except ImportError as error:
        raise CommandError(f"--ray needs Ray Serve: pip install 'elgs[ray]' ({error})") from None
    num_gpus = args.num_gpus
    if num_gpus is None:
        import torch

        num_gpus = 1.0 if torch.cuda.is_available() and settings.device in (None, "cuda") else 0.0
    num_cpus = args.num_cpus
    if num_cpus is None:
        num_cpus = 1.0 if args.ray_address is not None else local_cpu_share(len(settings.models), max(1, args.replicas))
    try:
        options = RayOptions(replicas=args.replicas, ingress_replicas=args.ingress_replicas,
                             model_num_cpus=num_cpus, model_num_gpus=num_gpus)
    except ValueError as error:
        raise CommandError(str(error)) from None
    serve_forever(settings, options, address=args.ray_address)
    return 0
