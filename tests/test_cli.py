import json
import subprocess
import sys

import pytest
from PIL import Image

from elgs.cli import main

CAT_CLASSES = ("Egyptian cat", "tabby", "tiger cat")


@pytest.mark.slow
def test_defend_chelsea_end_to_end(tmp_path, capsys):
    chelsea = tmp_path / "chelsea.png"
    from elgs.images import sample_photo

    sample_photo("chelsea").save(chelsea)
    out, mask = tmp_path / "defended.png", tmp_path / "mask.png"
    code = main(["defend", str(chelsea), "--model", "efficientnet_lite0", "--method", "slgs", "--lambda", "3.5",
                 "--out", str(out), "--mask-out", str(mask)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    first = next(line for line in lines if line.startswith("1. "))
    original, defended = first[3:37].strip(), first[39:].strip()
    assert original.startswith(CAT_CLASSES) and defended.startswith(CAT_CLASSES)
    assert Image.open(out).size == (224, 224) and Image.open(mask).mode == "L"


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: argument errors must come out before the weights load."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("elgs.models.load_model", load_model)


@pytest.fixture
def tiny_weights(monkeypatch):
    """Every model the CLI loads is the tiny test CNN (32 px, 10 classes): the CLI's own code, in a second."""
    from tests.conftest import make_tiny_model

    monkeypatch.setattr("elgs.models.load_model", lambda *args, **kwargs: make_tiny_model())


@pytest.mark.parametrize("argv,message", [
    (["defend", "/nonexistent/x.png", "--model", "efficientnet_lite0"], "no such image file: /nonexistent/x.png"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--method", "blur"],
     "unknown method 'blur'; choose one of lgs, slgs"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--lambda", "11"],
     "lambda must be a number in [0, 10], got 11.0"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--lambda", "nan"],
     "lambda must be a number in [0, 10], got nan"),
    (["defend", "skimage:chelsea", "--model", "vgg16", "--threshold", "-0.5"],
     "threshold must be a number in [0, 1], got -0.5"),
])
def test_defend_user_errors(argv, message, no_weights, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"elgs defend: error: {message}") and err.count("\n") == 1  # one line, no traceback


@pytest.mark.parametrize("option", ["--out", "--mask-out", "--json"])
def test_defend_refuses_an_output_it_cannot_write_before_loading(option, tmp_path, no_weights, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")  # so root, who ignores permissions, cannot write under it either
    target = blocker / "out.png"
    assert main(["defend", "skimage:chelsea", "--model", "efficientnet_lite0", option, str(target)]) == 2
    assert capsys.readouterr().err == f"elgs defend: error: {option} {target}: {blocker} is not a folder\n"
    assert main(["defend", "skimage:chelsea", "--model", "efficientnet_lite0", option, str(tmp_path / "no" / "x")]) == 2
    assert capsys.readouterr().err.endswith(f"no such folder {tmp_path / 'no'}\n")
    assert main(["defend", "skimage:chelsea", "--model", "efficientnet_lite0", option, str(tmp_path)]) == 2
    assert capsys.readouterr().err.endswith(": is a folder, not a file\n")


def test_defend_writes_the_image_mask_and_json(tmp_path, tiny_weights, capsys):
    out, mask, answer = tmp_path / "defended.png", tmp_path / "mask.png", tmp_path / "answer.json"
    argv = ["defend", "skimage:chelsea", "--method", "lgs", "--lambda", "2.5", "--attack-threshold", "0.5",
            "--out", str(out), "--mask-out", str(mask), "--json", str(answer)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "method lgs (lambda 2.5, threshold 0.2)" in printed and f"mask written to {mask}" in printed
    assert Image.open(out).size == (32, 32) and Image.open(out).mode == "RGB" and Image.open(mask).mode == "L"
    written = json.loads(answer.read_text())
    assert (written["method"], written["lambda"], written["attack_threshold"]) == ("lgs", 2.5, 0.5)
    assert written["attacked"] == (written["attack_score"] > 0.5)
    assert len(written["original_predictions"]) == len(written["predictions"]) == 5


def test_defend_write_error_is_one_line(tmp_path, tiny_weights, monkeypatch, capsys):
    """A write that fails after the checks (a full disk, a folder made read-only meanwhile): no traceback."""
    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.write_bytes", refuse)
    out = tmp_path / "defended.png"
    assert main(["defend", "skimage:chelsea", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"elgs defend: error: --out {out}: cannot write: Permission denied\n"


def test_unreadable_image(tmp_path, no_weights, capsys):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    assert main(["defend", str(bad), "--model", "efficientnet_lite0"]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_unknown_model_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", "skimage:chelsea", "--model", "resnet9000"])
    assert exit_info.value.code == 2 and "invalid choice: 'resnet9000'" in capsys.readouterr().err


def test_offline_vgg16_refusal_is_clean(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ELGS_ALLOW_DOWNLOAD", "0")
    assert main(["defend", "skimage:chelsea", "--model", "vgg16"]) == 2
    assert "vgg16-397923af.pth" in capsys.readouterr().err


def test_console_script_help_lists_defences():
    out = subprocess.run([sys.executable, "-m", "elgs", "defenses"], capture_output=True, text=True, check=True).stdout
    for name in ("lgs", "slgs", "wlgs", "jpeg", "median", "gaussian", "none"):
        assert f"\n{name} " in "\n" + out


def test_data_uploads_writes_each_format_into_its_own_folder(tmp_path, capsys):
    assert main(["data", "uploads", "--out", str(tmp_path)]) == 0
    png, jpeg = sorted((tmp_path / "photos-png").iterdir()), sorted((tmp_path / "photos-jpeg").iterdir())
    assert len(png) == len(jpeg) == 88  # 22 photographs x 4 variants; 'native' is left out by default
    assert png[0].name == "astronaut-1024px.png" and jpeg[0].name == "astronaut-1024px.jpg"
    assert not any("native" in p.name for p in png + jpeg)
    with Image.open(png[0]) as image:
        assert image.format == "PNG" and max(image.size) == 1024
    with Image.open(jpeg[0]) as image:
        assert image.format == "JPEG" and max(image.size) == 1024
    assert "88 uploads in" in capsys.readouterr().out
