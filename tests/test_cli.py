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


@pytest.mark.parametrize("argv,message", [
    (["defend", "/nonexistent/x.png", "--model", "efficientnet_lite0"], "no such image file"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--method", "blur"], "unknown method 'blur'"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--lambda", "11"], "lambda must be a number in [0, 10]"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--lambda", "nan"], "lambda must be a number"),
])
def test_defend_user_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_unreadable_image(tmp_path, capsys):
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
