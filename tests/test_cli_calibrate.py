"""`elgs defend --saliency/--attack-threshold` and `elgs calibrate` through the CLI entry point."""

import json

import pytest

from elgs.cli import main


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: argument errors must come out before the weights load."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("elgs.models.load_model", load_model)


def _one_line_error(capsys, command: str, message: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith(f"elgs {command}: error: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv,message", [
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--saliency", "blur"],
     "saliency: unknown saliency estimator 'blur'"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--saliency", "smoothgrad:n=99"],
     "saliency: n must be in [1, 32], got 99"),
    (["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--attack-threshold", "3"],
     "attack_threshold must be a number in [0, 2], got 3.0"),
])
def test_defend_rejects_bad_saliency_and_attack_threshold(argv, message, no_weights, capsys):
    assert main(argv) == 2
    _one_line_error(capsys, "defend", message)


@pytest.mark.parametrize("extra,message", [
    (["--data", "/nonexistent"], "no such data folder: /nonexistent"),
    (["--methods", "lgs,blur"], "unknown method 'blur'"),
    (["--lambdas", "2,x"], "--lambdas must be numbers"),
    (["--lambdas", "12"], "--lambdas must lie in [0, 10]"),
    (["--fpr", "1.5"], "--fpr must be in [0, 1), got 1.5"),
    (["--weights", "random"], "calibrating random weights is pointless"),
    (["--saliency", "smoothgrad:n=99"], "--saliency smoothgrad:n=99: n must be in [1, 32], got 99"),
    (["--saliency", "blur"], "--saliency blur: unknown saliency estimator 'blur'"),
])
def test_calibrate_user_errors(tmp_path, extra, message, no_weights, capsys):
    from elgs.images import sample_photo

    sample_photo("coffee").save(tmp_path / "coffee.png")
    argv = ["calibrate", "--model", "efficientnet_lite0", "--data", str(tmp_path), "--out", str(tmp_path / "c.json")]
    assert main(argv + extra) == 2
    _one_line_error(capsys, "calibrate", message)
    assert not (tmp_path / "c.json").exists()


def test_calibrate_checks_its_output_file_before_loading(tmp_path, no_weights, capsys):
    from elgs.images import sample_photo

    sample_photo("coffee").save(tmp_path / "coffee.png")
    argv = ["calibrate", "--model", "efficientnet_lite0", "--data", str(tmp_path), "--out"]
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main([*argv, str(blocker / "deeper" / "c.json")]) == 2  # missing folders are made, but not under a file
    _one_line_error(capsys, "calibrate", f"--out {blocker / 'deeper' / 'c.json'}: {blocker} is not a folder")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")  # the models already in the file are kept, so it must be one
    assert main([*argv, str(broken)]) == 2
    _one_line_error(capsys, "calibrate", f"{broken} is not valid JSON")


@pytest.mark.parametrize("option", ["--batch-size", "--limit"])
def test_calibrate_counts_must_be_positive(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "--data", str(tmp_path), option, "0"])
    assert exit_info.value.code == 2 and f"{option}: must be an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_then_defend_reads_the_thresholds(tmp_path, monkeypatch, capsys):
    from elgs.images import sample_photo

    data = tmp_path / "clean"
    data.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        sample_photo(name).save(data / f"{name}.png")
    calibration = tmp_path / "calibration.json"
    monkeypatch.setenv("ELGS_CALIBRATION_FILE", str(calibration))
    code = main(["calibrate", "--model", "efficientnet_lite0", "--data", str(data), "--fpr", "0.34",
                 "--methods", "lgs", "--lambdas", "3.5", "--batch-size", "3"])
    assert code == 0, capsys.readouterr().err
    block = json.loads(calibration.read_text())["models"]["efficientnet_lite0"]
    assert (block["fpr"], block["images"], block["input_size"]) == (0.34, 3, 224)
    removal, entry = block["entries"]  # the removal view's own threshold comes first
    assert (removal["method"], removal["lam"], removal["saliency"]) == ("removal", 3.5, None)
    assert (entry["method"], entry["lam"], entry["saliency"]) == ("lgs", 3.5, None)
    assert entry["clean_flagged"] == pytest.approx(1 / 3)  # ceil(0.66 * 3) = 2nd smallest: one image above
    # the verdict also needs a changed top-1 and a failed removal check: at most that one image, per folder too
    assert entry["false_positive_rate"] in (0, pytest.approx(1 / 3))
    assert entry["false_positive_by_kind"] == {"clean": entry["false_positive_rate"]}
    assert "false positives" in capsys.readouterr().out
    capsys.readouterr()
    out = tmp_path / "answer.json"
    assert main(["defend", "skimage:chelsea", "--model", "efficientnet_lite0", "--method", "lgs", "--json", str(out)]) == 0
    answer = json.loads(out.read_text())
    assert answer["attack_threshold"] == pytest.approx(entry["threshold"])
    changed = answer["predictions"][0]["index"] != answer["original_predictions"][0]["index"]
    assert answer["attacked"] is (changed and answer["attack_score"] > entry["threshold"]
                                  and answer["removal_top1"]["index"] != answer["original_predictions"][0]["index"])
    if answer["attacked"]:  # the answer with the suspect removed outright
        assert answer["final_predictions"][0] == answer["removal_top1"]
    else:
        assert answer["final_predictions"] == answer["original_predictions"]
    assert "attack score" in capsys.readouterr().out
