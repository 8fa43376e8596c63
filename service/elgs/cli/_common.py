"""What every command module shares: :class:`CommandError`, the model options and the model loading.

No command module imports :mod:`elgs.cli` itself (the package imports them), only this module.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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


def check_output_file(option: str, path: str | os.PathLike | None, *, make_folders: bool = False) -> None:
    """Raise CommandError now when ``path``, the file of ``option``, cannot be written: before the slow work.

    Args:
        option: the option that names it, for the message (``--out``).
        path: the file (None: the option was not given).
        make_folders: the command creates missing folders, so only the nearest existing one must be writable.
    """
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise CommandError(f"{option} {path}: is a folder, not a file")
    if target.exists() and not os.access(target, os.W_OK):
        raise CommandError(f"{option} {path}: the file is not writable")
    folder = target.parent
    while make_folders and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.exists():
        raise CommandError(f"{option} {path}: no such folder {folder}")
    if not folder.is_dir():
        raise CommandError(f"{option} {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: cannot write into {folder}")


def write_output_file(option: str, path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` into ``path`` (the file of ``option``); an OS error becomes a one-line CommandError."""
    try:
        if isinstance(data, str):
            Path(path).write_text(data)
        else:
            Path(path).write_bytes(data)
    except OSError as error:
        raise CommandError(f"{option} {path}: cannot write: {error.strerror or error}") from None
