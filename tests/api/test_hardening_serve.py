"""``elgs serve`` bounds concurrent connections (uvicorn's limit_concurrency) from the settings."""

from __future__ import annotations

import pytest
from elgs.cli import main



@pytest.fixture
def served(monkeypatch):
    """Run ``elgs serve`` with the tiny model and uvicorn.run replaced; the kwargs uvicorn got."""
    import elgs.cli.serve
    import uvicorn

    calls = []
    # serve checks the names without loading (the app loads in its compute threads): uvicorn never runs here.
    monkeypatch.setattr(elgs.cli.serve, "check_loadable", lambda settings: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    for name in ("ELGS_MAX_CONNECTIONS", "ELGS_MODELS"):
        monkeypatch.delenv(name, raising=False)

    def serve(*args: str) -> dict:
        assert main(["serve", "--models", "tiny", "--weights", "random", *args]) == 0
        return calls[-1]

    return serve


def test_serve_limits_concurrent_connections(served, monkeypatch):
    from elgs.api.middleware import CONNECTION_HEADROOM

    # The app's own limit answers first (JSON 503 with a request id); uvicorn's sits above it.
    assert served()["limit_concurrency"] == 1000 + CONNECTION_HEADROOM
    assert served("--max-connections", "7")["limit_concurrency"] == 7 + CONNECTION_HEADROOM
    monkeypatch.setenv("ELGS_MAX_CONNECTIONS", "33")
    assert served()["limit_concurrency"] == 33 + CONNECTION_HEADROOM
