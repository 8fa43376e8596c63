"""The CLI package's shape (issue 11): one model-options helper, every command's help, and a lean runtime:
``elgs serve`` and the app never import httpx or matplotlib, which come with the ``bench`` extra."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from elgs.cli import build_parser, main
from elgs.models import MODELS

ROOT = Path(__file__).resolve().parents[1]
BENCH_ONLY = ("httpx", "matplotlib")


def _subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(("attack", "train"), parser)`` for every leaf command of ``parser``."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield path, parser
        return
    for name, child in actions[0].choices.items():
        yield from _subcommands(child, (*path, name))


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


COMMANDS = [path for path, _ in _subcommands(build_parser())]


def test_the_commands_are_all_there():
    assert COMMANDS == [("defend",), ("calibrate",), ("models", "list"), ("models", "fetch"), ("defenses",),
                        ("bench", "defenses"), ("bench", "service"), ("bench", "robustness"), ("bench", "flood"),
                        ("bench", "placement"), ("bench", "precision"), ("bench", "estimators"),
                        ("bench", "saliency-probe"), ("bench", "through"), ("serve",), ("attack", "train"),
                        ("attack", "eval"), ("data", "samples"), ("data", "uploads")]


@pytest.mark.parametrize("path", [(), *COMMANDS, ("models",), ("bench",), ("attack",), ("data",)],
                         ids=lambda path: " ".join(path) or "elgs")
def test_every_help_works(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith(f"usage: {' '.join(('elgs', *path))}")


def test_model_loading_commands_share_one_model_options_helper():
    """Every command that loads a zoo model takes --model/--weights/--device from elgs.cli._common, each
    with its own default model: the same choices, defaults and help everywhere but --model's default."""
    loading = {" ".join(path): _options(parser) for path, parser in _subcommands(build_parser())
               if "--model" in _options(parser) and _options(parser)["--model"].choices == list(MODELS)}
    assert {name: options["--model"].default for name, options in loading.items()} == {
        "defend": "vgg16", "calibrate": "efficientnet_lite0", "attack train": "efficientnet_lite0",
        "attack eval": None, "data samples": "efficientnet_lite0"}
    assert loading["attack eval"]["--model"].help == "zoo model (default: the patch's)"
    assert loading["defend"]["--model"].help == "zoo model (default vgg16)"
    for option in ("--weights", "--device"):
        described = {(tuple(a.option_strings), a.default, tuple(a.choices or ()), a.help)
                     for a in (options[option] for options in loading.values())}
        assert len(described) == 1, described
    # --input-size where the command has no --image-size of its own
    assert {name for name, options in loading.items() if "--input-size" in options} == {"defend", "calibrate"}
    assert all("--image-size" in options for name, options in loading.items() if name not in ("defend", "calibrate"))


def test_defend_and_attack_train_help_show_the_same_model_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")

    def option_lines(*argv: str) -> list[str]:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return [line.strip() for line in capsys.readouterr().out.splitlines()
                if line.strip().startswith(("--weights", "--device"))]

    defend, train = option_lines("defend"), option_lines("attack", "train")
    assert len(defend) == 2 and defend == train
    assert "$ELGS_DEVICE" in defend[1]


def test_model_load_errors_are_one_line(capsys, monkeypatch, tmp_path):
    """load_model_or_fail turns the zoo's errors into CommandError for every command that loads a model."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ELGS_ALLOW_DOWNLOAD", "0")
    (tmp_path / "data").mkdir()
    for argv in (["defend", "skimage:chelsea", "--model", "vgg16"],
                 ["attack", "train", "--model", "vgg16", "--target", "toaster", "--data", str(tmp_path / "data")],
                 ["data", "samples", "--model", "vgg16", "--out", str(tmp_path / "samples")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"elgs {argv[0]}: error: ") and "vgg16-397923af.pth" in err and "Traceback" not in err


def test_serve_and_the_app_import_neither_httpx_nor_matplotlib():
    """The runtime stays lean: parsing `elgs serve`, building the app and running its lifespan (load, warm-up)
    import nothing of the bench extra."""
    code = (
        "import asyncio, sys\n"
        "import elgs.api.app\n"
        "from elgs.api import Settings, create_app\n"
        "from elgs.cli import build_parser, main\n"
        "try:\n"
        "    main(['serve', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0\n"
        "assert main(['defenses']) == 0\n"
        "build_parser().parse_args(['serve', '--models', 'efficientnet_lite0'])\n"
        "app = create_app(Settings(models=['efficientnet_lite0'], weights='random', device='cpu', input_size=64))\n"
        "async def run():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        assert app.state.service is not None\n"
        "asyncio.run(run())\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BENCH_ONLY!r})\n"
        "print('loaded', loaded, file=sys.stderr)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "service"), str(ROOT),
                                                                      os.environ.get("PYTHONPATH")]))}
    env.pop("MPLBACKEND", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded []" in done.stderr


def test_bench_is_an_extra_that_the_tests_pull():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [dependency.split(">")[0].split("=")[0].split("[")[0] for dependency in project["dependencies"]]
    assert not set(BENCH_ONLY) & set(names)
    extras = project["optional-dependencies"]
    assert sorted(extras["bench"]) == ["httpx>=0.27", "matplotlib>=3.8"]
    assert set(extras["bench"]) <= set(extras["test"])
    assert project["scripts"]["elgs"] == "elgs.cli:main"


def test_bench_without_the_extra_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "httpx", None)  # `import httpx` now raises ImportError
    assert main(["bench", "service", "--url", "http://127.0.0.1:1", "--no-floor"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elgs bench: error: the service benchmark needs httpx and matplotlib: "
                          "pip install 'elgs[bench]' (")
    assert err.count("\n") == 1


def test_attack_eval_without_matplotlib_writes_the_json_and_says_why_no_plot(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tmp_path / "patch.png")
    (tmp_path / "data").mkdir()
    for index, colour in enumerate(((30, 30, 200), (30, 200, 30))):
        Image.new("RGB", (96, 96), colour).save(tmp_path / "data" / f"{index}.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    report, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    assert main(["attack", "eval", "--data", str(tmp_path / "data"), "--patch", str(tmp_path / "patch.png"),
                 "--target", "toaster", "--image-size", "96", "--weights", "random", "--device", "cpu",
                 "--methods", "none", "--whole-photos", "none", "--json", str(report), "--plot", str(plot),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert report.is_file() and not plot.exists() and "Traceback" not in captured.err
    assert f"no plot: {plot} needs matplotlib, pip install 'elgs[bench]'" in captured.out.splitlines()
