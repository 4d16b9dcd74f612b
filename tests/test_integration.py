"""Real servers on 127.0.0.1: `prefect server` + `mlflow server`, the work pool, `prefect deploy --all` of
prefect.yaml, a process worker, and a flow run of `sd2-pipeline` triggered through the REST API as the UI
does; the results are then read back through MLflow's REST API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sd2.cli import LEASES

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    pp, mp = _port(), _port()
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{pp}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mp}",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", SD2_HOME=str(root / "home"), SD2_CHECKOUT=str(ROOT),
               SD2_RUNS_DIR=str(root / "runs"), PREFECT_LOCAL_STORAGE_PATH=str(root / "home" / "prefect-results"),
               PREFECT_RESULTS_PERSIST_BY_DEFAULT="true", PYTHONPATH=str(ROOT))
    procs, logs = [], {}
    for name, cmd in [
        ("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pp)]),
        ("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mp), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                    "--artifacts-destination", str(root / "mlflow-artifacts")]),
    ]:
        logs[name] = root / f"{name}.log"
        procs.append(subprocess.Popen(cmd, env=env, stdout=logs[name].open("w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        _wait(f"http://127.0.0.1:{pp}/api/health", procs[0], logs["prefect"])
        _wait(f"http://127.0.0.1:{mp}/health", procs[1], logs["mlflow"])
        yield {"root": root, "env": env, "prefect": f"http://127.0.0.1:{pp}/api", "mlflow": f"http://127.0.0.1:{mp}",
               "procs": procs}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def _run(cmd, env, timeout=300):
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r.stdout


def test_deploy_trigger_and_read_back(stack, tok300, seed_file):
    from sd2.models import save_model
    from tests.conftest import make_llama

    env, api, ml = stack["env"], stack["prefect"], stack["mlflow"]
    target = stack["root"] / "target"
    save_model(make_llama(len(tok300), layers=4, seed=1, eos=tok300.eos_token_id, hidden=64), tok300, target)
    evalf = stack["root"] / "eval.jsonl"
    evalf.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [f"the lazy dog {i}"]}) + "\n"
                             for i, c in enumerate(["a", "b"])))

    _run([str(BIN / "prefect"), "work-pool", "create", "sd2", "--type", "process"], env)
    _run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env)

    deps = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}
    assert {"sd2-pipeline", "sparsity-sweep", "nightly-eval", "sweep-cell"} <= set(deps)
    sweep = deps["sparsity-sweep"]
    assert sweep["schedules"] and sweep["schedules"][0]["schedule"]["cron"] == "0 3 * * 0"
    assert sweep["schedules"][0]["parameters"]["config"]["sweep"]["methods"] == ["sparsegpt", "wanda"]
    assert deps["nightly-eval"]["schedules"][0]["schedule"]["cron"] == "30 2 * * *"
    assert deps["sd2-pipeline"]["work_pool_name"] == "sd2"

    # The UI's custom-run form is this schema: it shows the constraints, and the server refuses what breaks them.
    schema = deps["sd2-pipeline"]["parameter_openapi_schema"]
    grid = schema["definitions"]["SweepGrid"]["properties"]
    assert grid["sparsities"]["items"]["exclusiveMaximum"] == 1.0 and grid["sparsities"]["items"]["minimum"] == 0.0
    assert grid["patterns"]["items"]["pattern"].startswith("^(unstructured|")
    assert grid["methods"]["items"]["enum"] == ["sparsegpt", "wanda", "magnitude"]
    for bad, field in [({"sweep": {"sparsities": [1.5]}}, "sparsities"), ({"sweep": {"patterns": ["2-4"]}}, "patterns"),
                       ({"gamma": 0}, "gamma"), ({"device": "gpu"}, "device")]:
        r = httpx.post(f"{api}/deployments/{deps['sd2-pipeline']['id']}/create_flow_run",
                       json={"parameters": {"config": bad}})
        assert r.status_code == 409 and field in r.text, (bad, r.status_code, r.text)
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {
        "any_": [deps["sd2-pipeline"]["id"]]}}}).json()
    assert runs == []  # no run was created for them (the scheduled deployments make their own runs)

    worker_log = stack["root"] / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "-p", "sd2", "--limit", "1"], env=env,
                              cwd=ROOT, stdout=worker_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    stack["procs"].append(worker)

    params = {"config": {"name": "it-pipeline", "profile": "tiny", "target": str(target),
                         "seed_prompts": str(seed_file), "eval_prompts": str(evalf), "drafter_layers": "0,-1",
                         "sweep": {"methods": ["wanda"], "patterns": ["unstructured"], "sparsities": [0.5]}}}
    r = httpx.post(f"{api}/deployments/{deps['sd2-pipeline']['id']}/create_flow_run", json={"parameters": params})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    t0, state = time.time(), None
    while time.time() - t0 < 900:
        state = httpx.get(f"{api}/flow_runs/{run_id}").json()["state"]
        if state and state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(3)
    assert state and state["type"] == "COMPLETED", f"{state}\n{worker_log.read_text()[-4000:]}"

    exp = httpx.get(f"{ml}/api/2.0/mlflow/experiments/get-by-name",
                    params={"experiment_name": f"sd2/{target.name}"}).json()["experiment"]
    runs = httpx.post(f"{ml}/api/2.0/mlflow/runs/search",
                      json={"experiment_ids": [exp["experiment_id"]], "max_results": 100}).json()["runs"]
    tags = [{t["key"]: t["value"] for t in r_["data"].get("tags", [])} for r_ in runs]
    parents = [r_ for r_, t in zip(runs, tags) if t.get("sd2.kind") == "pipeline"]
    assert len(parents) == 1
    ptags = {t["key"]: t["value"] for t in parents[0]["data"]["tags"]}
    assert ptags["prefect.flow_run_id"] == run_id and run_id in ptags["prefect.flow_run_url"]
    children = [r_ for r_, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
    assert {t["sd2.drafter"] for t in tags if t.get("sd2.kind") == "drafter"} == {
        "derived-untuned", "dense-self-distilled", "wanda-unstructured-0.5", "layer-pruned-0.5"}
    for c in children:
        metrics = {m["key"] for m in c["data"]["metrics"]}
        assert {"mal", "acceptance_rate", "theoretical_speedup", "cost_ratio"} <= metrics
        arts = httpx.get(f"{ml}/api/2.0/mlflow/artifacts/list", params={"run_id": c["info"]["run_id"]}).json()
        assert "per_category.csv" in {f["path"] for f in arts.get("files", [])}
    alias = httpx.get(f"{ml}/api/2.0/mlflow/registered-models/alias",
                      params={"name": f"sd2-drafter-{target.name}", "alias": "champion"})
    assert alias.status_code == 200, alias.text


def test_sd2_ui_starts_both_servers_and_later_commands_use_them(tmp_path):
    pp, mp = _port(), _port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               SD2_RUNS_DIR=str(tmp_path / "runs"), PYTHONPATH=str(ROOT))
    r = subprocess.run([str(BIN / "sd2"), "ui", "--prefect-port", str(pp), "--mlflow-port", str(mp)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    state = json.loads((tmp_path / "runs" / "ui.json").read_text()) if (tmp_path / "runs" / "ui.json").exists() else {}
    try:
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"http://127.0.0.1:{pp}" in r.stdout and f"http://127.0.0.1:{mp}" in r.stdout
        assert httpx.get(f"http://127.0.0.1:{mp}/health").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{pp}/api/health").status_code == 200
        # the browser UI served on port P calls the API on port P (not Prefect's default 4200)
        ui = httpx.get(f"http://127.0.0.1:{pp}/ui-settings").json()
        assert ui["api_url"] == f"http://127.0.0.1:{pp}/api", ui
        # a later command reaches the MLflow server of `sd2 ui`: an experiment that only the server has
        assert httpx.post(f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/create",
                          json={"name": "sd2/probe"}).status_code == 200
        c = subprocess.run([str(BIN / "sd2"), "compare", "--experiment", "sd2/probe", "--format", "json"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert c.returncode == 0, c.stderr[-2000:]
        assert json.loads(c.stdout) == []
    finally:
        import signal

        for pid in state.get("pids", []):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def test_prefect_server_outage_mid_flow_keeps_the_stage_and_the_rerun_reuses_it(tmp_path, tiny_model_dir, seed_file):
    """Kill the Prefect server while a pipeline trains: the training stage still finishes and is stored, the
    flow run ends (Prefect cannot record it), and the same command after the server is back reuses every
    finished stage."""
    import yaml

    pp = _port()
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_API_URL=f"http://127.0.0.1:{pp}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", SD2_HOME=str(tmp_path / "home"),
               SD2_RUNS_DIR=str(tmp_path / "runs"), PREFECT_CLIENT_MAX_RETRIES="1", PYTHONPATH=str(ROOT),
               PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASES)  # as `sd2 ui` and infra/compose start it
    env.pop("MLFLOW_TRACKING_URI", None)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "outage", "profile": "tiny", "target": str(tiny_model_dir),
                                   "seed_prompts": str(seed_file), "drafter_layers": "0,-1", "train_steps": 40,
                                   "sweep": {"methods": ["magnitude"], "sparsities": [0.5]},
                                   "layer_baseline": False, "register_champion": False}))
    home = tmp_path / "home" / "artifacts"

    def server(log):
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pp)],
                                env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        _wait(f"http://127.0.0.1:{pp}/api/health", proc, log)
        return proc

    srv = server(tmp_path / "server1.log")
    flow = subprocess.Popen([str(BIN / "sd2"), "pipeline", "--config", str(cfg)], env=env, cwd=ROOT,
                            stdout=(tmp_path / "flow1.log").open("w"), stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not list(home.glob("train/*.partial")) and time.time() - t0 < 300:
            assert flow.poll() is None, (tmp_path / "flow1.log").read_text()[-3000:]
            time.sleep(0.2)
        assert list(home.glob("train/*.partial")), "training never started"
        os.killpg(srv.pid, 9)
        srv.wait()
        t_kill = time.time()
        rc = flow.wait(timeout=600)
        crashed_after = time.time() - t_kill
    finally:
        if flow.poll() is None:
            flow.kill()
    log1 = (tmp_path / "flow1.log").read_text()
    assert rc != 0, log1[-3000:]
    trained = [d for d in home.glob("train/*") if d.is_dir() and (d / "config.json").exists()]
    assert len(trained) == 1, log1[-3000:]  # the stage in flight finished and was kept
    kept = {f: f.stat().st_mtime_ns for d in [*trained, *home.glob("distill/*")] if d.is_dir() for f in d.rglob("*")
            if f.is_file()}

    srv = server(tmp_path / "server2.log")
    try:
        t0 = time.time()
        r = subprocess.run([str(BIN / "sd2"), "pipeline", "--config", str(cfg)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=400)
        rerun = time.time() - t0
    finally:
        os.killpg(srv.pid, 15)
        srv.wait(30)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert {f: f.stat().st_mtime_ns for f in kept} == kept  # distilled data and trained drafter not redone
    print(f"flow ended {crashed_after:.0f} s after the server died; rerun {rerun:.0f} s")
