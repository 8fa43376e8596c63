"""`elgs bench defenses` estimator rows: one row per spec, canonical names, positive timings."""

import torch

from elgs.bench.defenses import benchmark_estimators
from tests.conftest import make_tiny_model


def test_estimator_rows_time_each_spec_through_the_engine():
    model = make_tiny_model()
    rows = benchmark_estimators(model, torch.rand(2, 3, 32, 32), ["gradient", "smoothgrad:n=3"], repeats=2)
    assert [r["saliency"] for r in rows] == ["gradient:rectify=false,quantile=1",
                                            "smoothgrad:n=3,sigma=0.2,rectify=false,seed=0,quantile=0.9"]
    for row in rows:
        assert row["batch_ms"] >= row["pass1_ms"] > 0
        assert row["images_per_s"] == 2 * 1000 / row["batch_ms"]
    assert model.module.calls == 2 * (2 + 2 * 2)  # warm-up and 2 rounds per spec, two model calls per batch
