"""The service load benchmark: its statistics, its load generator against a real server, and one
short end-to-end run that starts its own two servers (EfficientNet-Lite0, random weights, 64 px)."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from elgs.bench.service import (
    LevelResult,
    combine_floors,
    engine_throughput,
    engine_throughput_in_subprocess,
    best_floor,
    floor_batch_sizes,
    floor_summary,
    format_table,
    interleaved_ratio,
    model_floor,
    percentile,
    run_level,
    sample_uploads,
)
from elgs.cli import main
from tests.client.servers import live_tiny_server
from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def live_server():
    """A real uvicorn on 127.0.0.1 serving the tiny CNN."""
    with live_tiny_server() as server:
        yield server


def test_percentile_by_hand():
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1 and percentile([4, 1, 3, 2], 100) == 4
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="101"):
        percentile([1], 101)


def _level(mode: str, concurrency: int, throughput: float) -> LevelResult:
    return LevelResult(mode=mode, concurrency=concurrency, requests=10, errors=0, duration_s=1.0,
                       throughput=throughput, p50_ms=10.0, p95_ms=20.0, p99_ms=30.0, mean_batch_size=2.0)


def test_table_lists_levels_then_each_modes_ceiling_and_ratio():
    levels = [_level("batching on", 1, 5.0), _level("batching on", 8, 9.0), _level("batching off", 8, 4.0)]
    engine = {"batching on": {"batch_size": 4, "throughput": 10.0, "concurrency": 8, "ratio": 0.9,
                              "rounds": [{"http": 9.0, "engine": 10.0}]}}
    lines = format_table(levels, engine).splitlines()
    assert len(lines) == 1 + 3 + 1
    assert lines[2].split()[:5] == ["batching", "on", "8", "9.00", "-"]
    assert "batch 4: 10.00 img/s" in lines[4] and "concurrency 8: 0.900" in lines[4] and "9.00/10.00" in lines[4]


def test_floor_ratios_by_hand():
    levels = [_level("batching on", 1, 5.0), _level("batching on", 8, 9.0), _level("batching off", 8, 4.0)]
    before = [{"batch_size": 4, "throughput": 11.0}, {"batch_size": 1, "throughput": 7.0}]
    after = [{"batch_size": 4, "throughput": 9.0}, {"batch_size": 1, "throughput": 9.0}]
    floor = combine_floors(before, after)
    assert floor[4]["throughput"] == 10.0 and floor[1]["throughput"] == 8.0 and floor[1]["batch_ms"] == 125.0
    summary = floor_summary(levels, {"batching on": 4, "batching off": 1}, floor)
    assert [level.floor_ratio for level in levels] == [0.5, 0.9, 0.5]
    assert summary["batching on"] == {"batch_size": 4, "floor_batch_size": 4, "floor": 10.0, "ratio_at_8": 0.9,
                                      "ratio_at_1": 5.0 / 8.0, "latency_at_1_over_floor": 10.0 / 125.0}
    assert summary["batching off"]["ratio_at_1"] is None and summary["batching off"]["ratio_at_8"] == 0.5
    levels[0].server_cpu_ms = 123.4
    lines = format_table(levels, None, floor, summary).splitlines()
    assert lines[1].split()[-1] == "123.4" and lines[2].split()[-1] == "-"
    assert lines[2].split()[:5] == ["batching", "on", "8", "9.00", "0.900"]
    assert "batch 4: 10.00 img/s (11.00/9.00)" in lines[4]
    assert ("concurrency 8: 0.900 of the best floor up to batch 4 (batch 4); concurrency 1: 0.625 of the batch-1 "
            "floor") in lines[6]


def test_the_batched_floor_is_the_best_batch_the_server_can_form():
    """SmoothGrad on a CPU: batch 2 beats batch 4 per image, so batch 2 is the ceiling of a batch-4 server."""
    assert floor_batch_sizes(4) == [1, 2, 4] and floor_batch_sizes(1) == [1] and floor_batch_sizes(6) == [1, 2, 4, 6]
    assert floor_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    floor = {size: {"batch_size": size, "throughput": rate, "batch_ms": size / rate * 1000}
             for size, rate in ((1, 2.5), (2, 2.8), (4, 2.0))}
    assert best_floor(floor, 4)["batch_size"] == 2 and best_floor(floor, 1)["batch_size"] == 1
    levels = [_level("batching on", 8, 2.24), _level("batching off", 8, 2.0)]
    summary = floor_summary(levels, {"batching on": 4, "batching off": 1}, floor)
    assert summary["batching on"]["floor_batch_size"] == 2 and summary["batching on"]["ratio_at_8"] == pytest.approx(0.8)
    assert summary["batching off"]["floor"] == 2.5 and levels[1].floor_ratio == pytest.approx(0.8)


@pytest.mark.parametrize(("method", "calls_per_batch"), [("slgs", 2), ("lgs", 2)])
def test_floor_is_a_plain_script_doing_the_requests_work(method, calls_per_batch):
    model = make_tiny_model()
    model.module.calls = 0
    rows = model_floor(model, sample_uploads(32, count=2), batch_sizes=[3, 1], duration_s=0.1, method=method)
    assert [row["batch_size"] for row in rows] == [3, 1]
    batches = sum(row["images"] // row["batch_size"] + 2 for row in rows)  # two warm-up batches per size
    assert model.module.calls == calls_per_batch * batches
    assert rows[0]["passes"] == ("decode, forward+input-gradient" if method == "slgs" else "decode, forward") + \
        ", forward (2 rows per image), 2 PNG encodes"  # pass 2: the defended image and the removal view
    assert all(row["throughput"] == pytest.approx(row["images"] / row["duration_s"]) for row in rows)


def test_floor_gradient_pass_carries_the_estimators_copies():
    model = make_tiny_model()
    seen_rows = []
    forward = model.module.forward
    model.module.forward = lambda x: (seen_rows.append(x.shape[0]), forward(x))[1]
    rows = model_floor(model, sample_uploads(32, count=2), batch_sizes=[2], duration_s=0.05, method="slgs",
                       saliency="smoothgrad:n=3,sigma=0.1")
    assert rows[0]["passes"] == "decode, forward+input-gradient (3 rows per image), forward (2 rows per image), " \
        "2 PNG encodes"
    assert set(seen_rows) == {6, 4}  # pass 1 on 2 images x 3 copies, pass 2 on 2 images and their removal views
    seen_rows.clear()
    model_floor(model, sample_uploads(32, count=2), batch_sizes=[2], duration_s=0.05, method="median")
    assert set(seen_rows) == {2}  # a filter has no removal view: pass 1 and pass 2 on the 2 images


def test_interleaved_ratio_alternates_engine_and_http(live_server):
    model = make_tiny_model()
    model.module.calls = 0
    uploads = sample_uploads(32, count=2)
    result = interleaved_ratio(
        live_server.url, uploads, lambda: engine_throughput(model, uploads, batch_size=2, duration_s=0.1, method="lgs"),
        duration_s=0.1, rounds=3, concurrency=2, method="lgs")
    assert (result["batch_size"], result["concurrency"], len(result["rounds"])) == (2, 2, 3)
    for row in result["rounds"]:
        assert row["ratio"] == pytest.approx(row["http"] / row["engine"]) and row["http"] > 0
    assert result["ratio"] == sorted(row["ratio"] for row in result["rounds"])[1]
    assert model.module.calls > 0  # the engine ran here, on the model given


def test_load_generator_against_a_real_server(live_server):
    uploads = sample_uploads(32, count=3)
    result = asyncio.run(run_level(live_server.url, uploads, concurrency=3, duration_s=0.3, method="slgs"))
    assert result.errors == 0 and result.requests >= 3
    assert result.throughput == pytest.approx(result.requests / result.duration_s)
    assert result.duration_s >= 0.3
    assert 0 < result.p50_ms <= result.p95_ms <= result.p99_ms
    assert 1 <= result.mean_batch_size <= 3
    failing = asyncio.run(run_level(live_server.url, uploads, concurrency=1, duration_s=0.2, method="nope"))
    assert failing.requests == 0 and failing.errors >= 1 and set(failing.error_statuses) == {"404"}
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(run_level(live_server.url, uploads, concurrency=0, duration_s=1))


def test_engine_throughput_counts_whole_batches():
    model = make_tiny_model()
    model.module.calls = 0
    result = engine_throughput(model, sample_uploads(32, count=2), batch_size=3, duration_s=0.2, method="lgs")
    assert result["batch_size"] == 3 and result["images"] % 3 == 0 and result["images"] >= 3
    # Two passes per batch (lgs needs no saliency), the two warm-up batches included.
    assert model.module.calls == 2 * (result["images"] // 3 + 2)
    assert result["throughput"] == pytest.approx(result["images"] / result["duration_s"])


def test_engine_measured_in_a_fresh_process_with_the_given_environment():
    import os

    result = engine_throughput_in_subprocess(
        "efficientnet_lite0", image_size=32, batch_size=2, duration_s=0.1, method="lgs", weights="random",
        device="cpu", input_size=32, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (result["batch_size"], result["weights"], result["device"], result["threads"]) == (2, "random", "cpu", 1)
    assert result["images"] >= 2 and result["throughput"] > 0


def test_end_to_end_starts_its_servers_and_writes_json_and_png(tmp_path, monkeypatch):
    # The engine ceiling is tested above on the tiny CNN; here it would only add two model loads.
    # The servers' OMP_WAIT_POLICY (PASSIVE) is this environment's too, so one floor run each time; and
    # torch's default spinning threads crawl on a busy test machine.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    exit_code = main(["bench", "service", "--weights", "random", "--input-size", "64", "--concurrency", "2", "--duration", "0.2",
                      "--method", "wlgs", "--no-engine", "--out", str(tmp_path)])
    assert exit_code == 0
    document = json.loads((tmp_path / "service_load.json").read_text())
    assert document["servers"] == {"batching on": 4, "batching off": 1}
    assert [(level["mode"], level["concurrency"]) for level in document["levels"]] == [
        ("batching on", 2), ("batching off", 2)]
    assert all(level["errors"] == 0 and level["requests"] > 0 for level in document["levels"])
    assert all(level["mean_batch_size"] == 1 for level in document["levels"] if level["mode"] == "batching off")
    assert document["engine"] == {} and document["http_engine_ratio_at_8"] == {}
    # The floor: a fresh process before and after the levels, at every power of two up to the batched server's size.
    assert [row["batch_size"] for row in document["floor"]["before"]] == [4, 2, 1]
    assert [row["batch_size"] for row in document["floor"]["after"]] == [4, 2, 1]
    assert set(document["floor"]["combined"]) == {"4", "2", "1"} and list(document["floor"]["runs"]["before"]) == ["inherited", "malloc tuned"]
    assert all(level["floor_ratio"] > 0 for level in document["levels"])
    assert set(document["floor_ratios"]) == {"batching on", "batching off"}
    assert all(level["server_cpu_ms"] > 0 and level["client_cpu_ms"] > 0 for level in document["levels"])
    assert all(row["cpu_ms_per_image"] > 0 for row in document["floor"]["before"])
    assert (document["model"], document["weights"], document["image_size"]) == ("efficientnet_lite0", "random", 64)
    assert (tmp_path / "service_load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "service", "--concurrency", "0,x"]) == 2


def test_registers_as_a_bench_action():
    from elgs.cli import build_parser
    from elgs.cli.bench import bench_service

    args = build_parser().parse_args(["bench", "service", "--concurrency", "1,8", "--url", "http://127.0.0.1:1",
                                      "--no-engine"])
    assert args.handler is bench_service and (args.concurrency, args.url, args.engine) == ("1,8", "http://127.0.0.1:1", False)
    assert (args.model, args.method, args.duration) == ("efficientnet_lite0", "slgs", 8.0)


def _load_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"
    spec = importlib.util.spec_from_file_location("load_benchmark_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help(run, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_the_script_and_the_command_take_the_same_options(capsys, monkeypatch):
    """benchmarks/load.py and `elgs bench service` share elgs.cli.bench.add_service_arguments and its
    checks; the command's description is the first paragraph of elgs.bench.service's docstring."""
    import elgs.bench.service
    from elgs.cli.bench import SERVICE_SUMMARY

    monkeypatch.setenv("COLUMNS", "120")
    script = _load_script()
    script_help = _help(script.main, capsys)
    command_help = _help(lambda argv: main(["bench", "service", *argv]), capsys)
    assert script_help.startswith("usage: benchmarks/load.py") and elgs.bench.service.__doc__.strip()[:60] in script_help
    assert script_help.split("\noptions:\n")[1] == command_help.split("\noptions:\n")[1]
    assert SERVICE_SUMMARY == " ".join(elgs.bench.service.__doc__.split("\n\n")[0].split()) in command_help
    assert script.main(["--concurrency", "0,x"]) == 2
    assert "error: --concurrency must be a comma list of positive integers" in capsys.readouterr().err
