"""The CLI end to end on the offline pretrained model at a small input size: samples, train, eval."""

from __future__ import annotations

import json

import pytest

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
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "no defence" in out and "LGS 3.5" in out
    rows = json.loads(report.read_text())["rows"]
    assert [row["method"] for row in rows] == ["none", "lgs"] and rows[0]["clean_accuracy"] == 1.0
    assert (tmp_path / "eval.png").is_file()


def test_user_errors_are_reported_without_traceback(tmp_path, capsys):
    assert main(["attack", "train", "--target", "no such class", "--data", str(tmp_path)]) == 2
    assert "unknown target class 'no such class'" in capsys.readouterr().err
    assert main(["attack", "train", "--target", "toaster", "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["attack", "eval", "--data", str(tmp_path), "--patch", str(tmp_path / "p.png"),
                 "--methods", "none,blur"]) == 2
    assert "blur" in capsys.readouterr().err
