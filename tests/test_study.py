"""The study report's claim checks on hand-made drafter runs (the shape MLflow returns): which drafter each claim
compares with which, when the study has no dense drafter."""

import pandas as pd

from sd2.study import claim_rows, drafter_table


def _run(name: str, kind: str, macs: float, mal: float, half_ci: float, **params) -> dict:
    return {"tags.sd2.drafter": name, "params.kind": kind, "params.gamma": "4", "metrics.mal": mal,
            "metrics.mal.g4": mal, "metrics.mal_ci95_lo.g4": mal - half_ci, "metrics.mal_ci95_hi.g4": mal + half_ci,
            "metrics.mal_ci95_lo": mal - half_ci, "metrics.mal_ci95_hi": mal + half_ci,
            "metrics.drafter_macs_per_token": macs, "metrics.cost_ratio": macs / 100e6, "metrics.acceptance_rate": 0.3,
            "metrics.theoretical_speedup": 1.0, "metrics.speedup": 0.6, "metrics.lossless": 1.0,
            "metrics.weight_bytes_ratio": 0.82, "metrics.drafter_time_ratio": 0.85, "metrics.predicted_speedup": 0.5,
            **{f"params.{k}": v for k, v in params.items()}}


def _kids() -> pd.DataFrame:
    return pd.DataFrame([
        _run("sparse-0.5", "sparse", 70e6, 2.50, 0.1, **{"prune.sparsity": "0.5", "prune.pattern": "unstructured"}),
        _run("sparse-2of4", "sparse", 71e6, 2.30, 0.1, **{"prune.sparsity": "0.5", "prune.pattern": "2:4"}),
        _run("sparse-0.72", "sparse", 40e6, 2.20, 0.1, **{"prune.sparsity": "0.72", "prune.pattern": "unstructured"}),
        _run("layer-pruned-0.72", "layer-pruned", 41e6, 1.70, 0.1, matched_to="sparse-0.72"),
    ])


def test_without_a_dense_drafter_the_macs_claim_is_made_against_the_least_compressed_unstructured_cell():
    rows = {r["claim"]: r for r in claim_rows(_kids(), "s")}
    macs = next(r for c, r in rows.items() if c.startswith("large MACs saving"))
    # the 2:4 cell has more MACs, but the reference is the unstructured one; 0.72 saves 42.9% (nearest 43.87%)
    assert "vs the least compressed drafter, sparse-0.5 (sparse-0.72)" in macs["claim"]
    assert macs["here"].startswith("42.86% fewer MACs, 12.00% less MAL")
    layer = rows["fine-grained sparsity beats layer pruning at equal MACs (sparse-0.72 vs layer-pruned-0.72)"]
    assert layer["verdict"] == "holds (95% CIs disjoint)" and layer["here"].startswith("1.294× MAL")


def test_the_drafter_table_shows_what_this_cpu_feels_beside_macs():
    t = drafter_table(_kids())
    assert list(t.columns[-5:]) == ["bytes ratio", "time ratio", "predicted speedup", "measured speedup", "lossless"]
    assert t["bytes ratio"].tolist() == ["0.820"] * 4 and t["time ratio"].iloc[0] == "0.850"
    old = _kids().drop(columns=["metrics.weight_bytes_ratio"])  # runs from before the metric: a dash, not a crash
    assert drafter_table(old)["bytes ratio"].tolist() == ["—"] * 4
