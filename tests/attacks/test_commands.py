"""The CLI end to end on the offline pretrained model at a small input size: samples, train, eval."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from elgs.cli import main


@pytest.mark.slow
def test_samples_train_eval_from_the_command_line(tmp_path, capsys):
    data = tmp_path / "samples"
    assert main(["data", "samples", "--out", str(data), "--image-size", "64", "--train", "4", "--heldout", "3",
                 "--min-confidence", "0"]) == 0
    assert "4 training and 3 held-out crops" in capsys.readouterr().out

    patch = tmp_path / "toaster.png"
    assert main(["attack", "train", "--attack", "lavan", "--target", "toaster", "--data", str(data / "train"),
                 "--image-size", "64", "--patch-size", "16", "--epochs", "2", "--batches-per-epoch", "1",
                 "--batch-size", "4", "--optimizer", "adam", "--out", str(patch), "--no-progress"]) == 0
    sidecar = json.loads(patch.with_suffix(".json").read_text())
    assert sidecar["target"] == 859 and sidecar["image_size"] == 64 and len(sidecar["epoch_loss"]) == 2
    assert patch.with_suffix(".ckpt.pt").is_file()

    report = tmp_path / "eval.json"
    assert main(["attack", "eval", "--data", str(data / "heldout"), "--patch", str(patch), "--methods", "none,lgs",
                 "--lambdas", "3.5", "--json", str(report), "--plot", str(tmp_path / "eval.png"),
                 "--whole-photos", "native", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no defence" in out and "LGS 3.5" in out and "whole photographs uploaded as they are" in out
    document = json.loads(report.read_text())
    rows = document["rows"]
    assert [row["method"] for row in rows] == ["none", "lgs"] and rows[0]["clean_accuracy"] == 1.0
    assert len(document["photos"]) == 44 and rows[1]["whole_photos"]["images"] == 44
    assert (tmp_path / "eval.png").is_file()


def _error_line(capsys) -> str:
    """The one line a CommandError prints (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_user_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["attack", "train", "--target", "no such class", "--data", str(tmp_path)]) == 2
    assert "unknown target class 'no such class'" in _error_line(capsys)
    assert main(["attack", "train", "--target", "toaster", "--data", str(tmp_path / "missing")]) == 2
    assert "no such data folder" in _error_line(capsys)
    assert main(["attack", "train", "--target", "toaster", "--data", str(tmp_path)]) == 2
    assert "no images" in _error_line(capsys)
    assert main(["attack", "train", "--target", "toaster", "--data", str(tmp_path), "--init", "skimage:nothing"]) == 2
    assert "no sample photo 'nothing'" in _error_line(capsys)
    assert main(["attack", "train", "--target", "toaster", "--data", str(tmp_path), "--through-lambda", "50"]) == 2
    assert "through_lambda must be a number in [0, 10], got 50.0" in _error_line(capsys)
    patch = tmp_path / "p.png"
    assert main(["attack", "eval", "--data", str(tmp_path), "--patch", str(patch), "--methods", "none,blur"]) == 2
    assert "unknown method(s) blur" in _error_line(capsys)
    assert main(["attack", "eval", "--data", str(tmp_path), "--patch", str(patch), "--lambdas", "2,x"]) == 2
    assert "--lambdas must be a comma-separated list" in _error_line(capsys)
    assert main(["attack", "eval", "--data", str(tmp_path), "--patch", str(patch)]) == 2
    assert "no such image file" in _error_line(capsys)


def test_patch_larger_than_the_image_and_bad_lambda_fail_before_evaluating(tmp_path, capsys):
    Image.new("RGB", (60, 60), (200, 30, 30)).save(tmp_path / "patch.png")
    (tmp_path / "data").mkdir()
    Image.new("RGB", (64, 64), (30, 30, 200)).save(tmp_path / "data" / "blue.png")
    common = ["attack", "eval", "--data", str(tmp_path / "data"), "--patch", str(tmp_path / "patch.png"),
              "--target", "toaster", "--no-progress", "--image-size", "64"]
    assert main(common) == 2
    assert "a 60 px patch with a 10 px margin does not fit a 64 px image" in _error_line(capsys)
    assert main([*common[:-1], "96", "--lambdas", "20"]) == 2  # the patch fits a 96 px image
    assert "lambda must be a number in [0, 10], got 20.0" in _error_line(capsys)
