"""``elgs models list|fetch`` and ``elgs defenses``: what the registries hold."""

from __future__ import annotations

import argparse

from elgs.cli._common import CommandError, zoo_options
from elgs.defenses import DEFENSES, ESTIMATORS, LAMBDA_RANGE, THRESHOLD_RANGE
from elgs.models import MODELS, WeightsUnavailableError


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


def add_commands(subparsers) -> None:
    models = subparsers.add_parser("models", help="list the zoo or fetch weights")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    models_sub.add_parser("list", help="zoo entries and where their weights are").set_defaults(handler=_models_list)
    fetch = models_sub.add_parser("fetch", help="download pretrained weights into torchvision's cache")
    fetch.add_argument("names", nargs="+", choices=list(MODELS), metavar="MODEL")
    fetch.set_defaults(handler=_models_fetch)

    subparsers.add_parser("defenses", help="list the defences and their parameters").set_defaults(handler=_defenses)
