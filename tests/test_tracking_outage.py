"""MLflow server stopped mid-run: tracking calls are journaled locally, and `sd2 sync` sends them once the
server is back (same port, same store)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

BIN = Path(sys.executable).parent


def _start(port, root):
    log = (root / "mlflow.log").open("a")
    p = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                          "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                          "--artifacts-destination", str(root / "artifacts")],
                         env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(120):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(1)
    raise TimeoutError("mlflow server did not start")


def test_outage_is_journaled_then_synced(tmp_path, monkeypatch, tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("SD2_RUNS_DIR", str(tmp_path / "runs"))
    from sd2 import tracking
    from sd2.cli import app

    server = _start(port, tmp_path)
    res = {"mal": 2.0, "mal_ci95": [1.5, 2.5], "acceptance_rate": 0.3, "per_position_acceptance": [0.5, 0.2],
           "drafter_macs_per_token": 1e5, "cost_ratio": 0.4, "theoretical_speedup": 1.11, "speedup": 1.0,
           "target_tokens_per_s": 10.0, "spec_tokens_per_s": 10.0, "lossless": True,
           "per_category": {"a": {"n_prompts": 1, "mal": 2.0, "acceptance_rate": 0.3, "speedup": 1.0}}}
    try:
        parent = tracking.start_parent("t", "outage")
        assert not parent.startswith(tracking.PENDING_PREFIX)
        os.killpg(server.pid, signal.SIGKILL)  # the server vanishes mid-run
        server.wait()
        t0 = time.time()
        child = tracking.log_drafter_run(parent, "t", "d1", {"kind": "dense"}, res, model_dir=tiny_model_dir)
        tracking.end_run(parent)
        assert child.startswith(tracking.PENDING_PREFIX) and time.time() - t0 < 120
        assert (tmp_path / "runs" / "pending" / "journal.jsonl").exists()

        server = _start(port, tmp_path)
        r = CliRunner().invoke(app, ["sync"])
        assert r.exit_code == 0 and "sent 2" in r.output, r.output
        assert not (tmp_path / "runs" / "pending").exists()
        df = tracking.compare("sd2/t")
        assert list(df["drafter"]) == ["d1"] and df["mal"].iloc[0] == pytest.approx(2.0)
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        run = client.get_run(df["run_id"].iloc[0])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert "per_category.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert client.get_run(parent).info.status == "FINISHED"
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
