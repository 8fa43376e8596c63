"""Settings have one reader: :class:`elgs.settings.Settings` (issue 11)."""

from __future__ import annotations

import re
from pathlib import Path


from elgs.settings import Settings

PACKAGE = Path(__file__).resolve().parent.parent / "service" / "elgs"


# Modules that may touch os.environ, and why: none of them interprets an ELGS_ value.
ENVIRONMENT_USERS = {
    "thresholds.py": "XDG_CONFIG_HOME, the desktop standard's config folder",
    "api/ray.py": "copies ELGS_* into the Ray replicas' environment, where Settings reads them",
    "bench/service.py": "builds the environment of the servers and floor processes it starts",
}


def test_no_module_but_settings_reads_the_environment():
    users = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
             if re.search(r"os\.environ|os\.getenv|getenv\(", path.read_text().replace("``os.environ``", ""))}
    assert users - {"settings.py"} <= set(ENVIRONMENT_USERS), users
    for name in ENVIRONMENT_USERS:
        lines = [line for line in (PACKAGE / name).read_text().splitlines() if "os.environ" in line]
        assert lines and not any(re.search(r"""os\.environ(\.get)?\s*[\[(]\s*["']ELGS_""", line) for line in lines)


def test_torch_threads_and_calibration_file_come_from_settings(monkeypatch, tmp_path, capsys):
    """The CLI reads the settings once and passes them down (torch threads, the calibration file)."""
    import torch

    from elgs.cli import main
    from elgs.thresholds import user_calibration_path

    monkeypatch.setenv("ELGS_TORCH_THREADS", "3")
    monkeypatch.setenv("ELGS_CALIBRATION_FILE", str(tmp_path / "c.json"))
    before = torch.get_num_threads()
    try:
        assert main(["defenses"]) == 0 and torch.get_num_threads() == Settings().torch_threads == 3
    finally:
        torch.set_num_threads(before)
    assert user_calibration_path(Settings().calibration_file) == tmp_path / "c.json"
    monkeypatch.setenv("ELGS_CALIBRATION_FILE", "")  # empty: the default place
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_calibration_path(Settings().calibration_file) == tmp_path / "elgs" / "calibration.json"
    monkeypatch.setenv("ELGS_TORCH_THREADS", "0")
    capsys.readouterr()
    assert main(["defenses"]) == 2 and "ELGS_TORCH_THREADS" in capsys.readouterr().err


def test_the_api_reexports_the_same_settings():
    from elgs.api.settings import Settings as ApiSettings

    assert ApiSettings is Settings
