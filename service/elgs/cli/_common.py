"""What every command module shares: :class:`CommandError`, the model options and the model loading.

No command module imports :mod:`elgs.cli` itself (the package imports them), only this module.
"""

from __future__ import annotations

import argparse

from elgs.models import MODELS, WeightsUnavailableError

# What brings httpx and matplotlib (elgs bench, the plot of elgs attack eval); elgs serve needs neither.
BENCH_EXTRA = "pip install 'elgs[bench]'"


class CommandError(Exception):
    """A user error: printed as ``elgs COMMAND: error: ...`` with exit status 2, no traceback."""


def model_arguments(parser: argparse.ArgumentParser, *, default: str | None, input_size: bool = True,
                    default_help: str = "the patch's") -> None:
    """``--model``, ``--weights``, ``--device`` and (``input_size``) ``--input-size``: the options every
    command that loads a zoo model takes, read by :func:`load_model_or_fail`.

    Args:
        default: the command's default model; None when the command decides later (``default_help``
            says how, e.g. ``attack eval`` takes the patch's).
        input_size: add ``--input-size``; commands with their own ``--image-size`` leave it out and pass
            it to :func:`load_model_or_fail`.
    """
    parser.add_argument("--model", default=default, choices=list(MODELS),
                        help=f"zoo model (default {default})" if default else f"zoo model (default: {default_help})")
    parser.add_argument("--weights", default="pretrained", choices=["pretrained", "random"],
                        help="'random' is for development only")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: $ELGS_DEVICE, else CUDA if present)")
    if input_size:
        parser.add_argument("--input-size", type=int, default=None, help="square input side (default: the model's)")


def zoo_options(device: str | None = None) -> dict:
    """``device`` (else ELGS_DEVICE), ELGS_WEIGHTS_DIR and ELGS_ALLOW_DOWNLOAD, read by :class:`Settings`
    (the one reader of the environment), as keyword arguments of :func:`elgs.models.load_model`."""
    from elgs.api.settings import Settings

    settings = Settings()
    return {"device": device or settings.device, "weights_dir": settings.weights_dir,
            "allow_download": settings.allow_download}


def calibration_file():
    """The ``calibration_file`` setting (``ELGS_CALIBRATION_FILE``; None: the default location), read by
    :class:`Settings` and passed down to the engine and ``elgs calibrate``."""
    from elgs.api.settings import Settings

    return Settings().calibration_file


def load_model_or_fail(args: argparse.Namespace, *, name: str | None = None, input_size: int | None = None):
    """Load the model of :func:`model_arguments`' options or raise CommandError.

    Args:
        args: parsed ``--model``, ``--weights``, ``--device`` (and ``--input-size`` when present).
        name: load this model instead of ``--model`` (``attack eval``: the patch's).
        input_size: this input side instead of ``--input-size`` (commands with ``--image-size``).
    """
    from elgs.models import load_model

    size = input_size if input_size is not None else getattr(args, "input_size", None)
    try:
        return load_model(name or args.model, weights=args.weights, input_size=size, **zoo_options(args.device))
    except (WeightsUnavailableError, ValueError, KeyError) as error:
        raise CommandError(str(error)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1; anything else is a one-line usage error naming the option."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value
