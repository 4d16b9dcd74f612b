"""Fault injection with real processes: SIGKILL during self-distillation and training, then the same command
again; the final artifacts must equal those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch

from sd2.models import load_model, save_model
from sd2.train import last_complete_checkpoint
from tests.conftest import make_llama
import pytest

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

SD2 = [sys.executable, "-m", "sd2.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _kill_when(cmd, cond, timeout=240):
    """Start cmd, SIGKILL it as soon as cond() holds; returns True if it was killed (False if it finished first)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(cmd)


def test_sigkill_during_distill_then_resume(tiny_model_dir, seed_file, tmp_path):
    args = ["distill", "--target", str(tiny_model_dir), "--prompts", str(seed_file), "--max-new-tokens", "48",
            "--batch-size", "1", "--shard-size", "2", "--threads", "1"]
    ref = tmp_path / "ref"
    subprocess.run([*SD2, *args, "--out", str(ref)], env=_env(), check=True, capture_output=True)
    out = tmp_path / "ds"
    shards = out.with_name("ds.partial") / "shards"
    killed = _kill_when([*SD2, *args, "--out", str(out)], lambda: len(list(shards.glob("shard-*.jsonl"))) >= 2)
    assert killed, "distillation finished before the kill"
    assert not out.exists()  # nothing that looks finished
    before = {f.name: f.stat().st_mtime_ns for f in shards.glob("shard-*.jsonl")}
    r = subprocess.run([*SD2, *args, "--out", str(out)], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert datasets.load_from_disk(str(out)).to_list() == datasets.load_from_disk(str(ref)).to_list()
    man = json.loads((out / "sd2_manifest.json").read_text())
    ref_man = json.loads((ref / "sd2_manifest.json").read_text())
    assert man["generated_tokens"] < ref_man["generated_tokens"]  # finished shards were not redone
    assert len(before) >= 2
    print(f"distill: uninterrupted {ref_man['generation_seconds_this_run']} s / {ref_man['generated_tokens']} tokens; "
          f"re-run after the kill {man['generation_seconds_this_run']} s / {man['generated_tokens']} tokens "
          f"({len(before)} shards kept)")


def test_sigkill_during_training_then_resume(tmp_path, tok300):
    init = tmp_path / "init"
    save_model(make_llama(len(tok300), layers=4, seed=5, eos=tok300.eos_token_id, hidden=192), tok300, init)
    rows = [{"prompt": f"the quick fox {i}", "response": "jumps over the lazy dog. " * 6} for i in range(64)]
    data = tmp_path / "data"
    datasets.Dataset.from_list(rows).save_to_disk(str(data))
    args = ["train", "--init", str(init), "--data", str(data), "--max-steps", "24", "--save-steps", "4",
            "--batch-size", "8", "--seq-len", "96", "--lr", "1e-3", "--threads", "1"]
    ref = tmp_path / "ref"
    subprocess.run([*SD2, *args, "--out", str(ref)], env=_env(), check=True, capture_output=True)
    out = tmp_path / "m"
    ck = tmp_path / "m.partial" / "checkpoints"
    killed = _kill_when([*SD2, *args, "--out", str(out)],
                        lambda: (ck / "checkpoint-12" / "trainer_state.json").exists())
    assert killed, "training finished before the kill"
    assert not out.exists()
    # a checkpoint torn while being written is skipped on resume
    torn = ck / "checkpoint-999"
    shutil.copytree(ck / "checkpoint-12", torn)
    (torn / "trainer_state.json").unlink()
    assert last_complete_checkpoint(ck).name != "checkpoint-999"
    done_at_kill = max(int(c.name.split("-")[1]) for c in ck.glob("checkpoint-*") if c.name != "checkpoint-999")
    t0 = time.time()
    r = subprocess.run([*SD2, *args, "--out", str(out), "--resume"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["global_step"] == 24
    print(f"train: killed after checkpoint-{done_at_kill}; resume ran {24 - done_at_kill} of 24 steps in "
          f"{time.time() - t0:.0f} s (process start included)")
    a, _ = load_model(str(ref))
    b, _ = load_model(str(out))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=2e-4, rtol=1e-3, msg=n)


def test_two_sweeps_share_a_stage_without_corruption(tiny_model_dir, tmp_path):
    """Two processes ask for the same prune cell at once: one computes it, the other waits and reuses it."""
    code = (
        "import sys, time; from tasks.stages import prune_task; from sd2.config import PruneSettings; t=time.time(); "
        "p = prune_task.fn(sys.argv[1], None, PruneSettings(method='magnitude', sparsity=0.5, calib_samples=4, "
        "seq_len=32)); "
        "print(p, time.time()-t)"
    )
    env = dict(_env(), SD2_HOME=str(tmp_path / "home"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    paths = {o[0].strip().splitlines()[-1].split()[0] for o in outs}
    assert len(paths) == 1
    out = Path(paths.pop())
    m, _ = load_model(str(out))
    assert json.loads((out / "sparsity.json").read_text())["sparsity"] > 0.49
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_sigkill_mid_pipeline_then_rerun_reuses_finished_stages(tiny_model_dir, seed_file, tmp_path):
    """`sd2 pipeline` killed after the dense drafter is trained: the re-run does not redo distillation or
    training (same output dirs, untouched), and finishes the sweep and evaluations."""
    cfg = tmp_path / "p.yaml"
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps({"question_id": i, "category": "a", "turns": [f"the dog {i}"]}) + "\n"
                          for i in range(2)))
    cfg.write_text(json.dumps({"name": "killed", "profile": "tiny", "target": str(tiny_model_dir),
                               "seed_prompts": str(seed_file), "eval_prompts": str(ev), "drafter_layers": "0,-1",
                               "layer_baseline": False,
                               "sweep": {"methods": ["magnitude"], "patterns": ["unstructured"], "sparsities": [0.5]}}))
    home = tmp_path / "home"
    # Prefect's result store must live with this test's SD2_HOME: results cached by another session would
    # point at that session's (deleted) output dirs.
    env = dict(_env(), SD2_HOME=str(home), SD2_RUNS_DIR=str(tmp_path / "runs"), PREFECT_HOME=str(tmp_path / "pf"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOCAL_STORAGE_PATH=str(home / "prefect-results"))
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)

    def trained():
        return any((d / "config.json").exists() for d in (home / "artifacts" / "train").glob("*")) \
            if (home / "artifacts" / "train").exists() else False

    errlog = tmp_path / "first.err"
    t0 = time.time()
    proc = subprocess.Popen([*SD2, "pipeline", "--config", str(cfg)], env=env, stdout=subprocess.DEVNULL,
                            stderr=errlog.open("w"), start_new_session=True)
    while not trained() and proc.poll() is None and time.time() - t0 < 400:
        time.sleep(0.1)
    assert proc.poll() is None, f"pipeline ended before the kill point: {errlog.read_text()[-1500:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = time.time() - t0
    stamps = {p: p.stat().st_mtime_ns for stage in ("distill", "train") for p in (home / "artifacts" / stage).glob("*")
              if p.is_dir()}
    assert stamps
    t0 = time.time()
    r = subprocess.run([*SD2, "pipeline", "--config", str(cfg)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "magnitude-unstructured-0.5" in r.stdout
    for p, t in stamps.items():
        assert p.stat().st_mtime_ns == t, f"{p} was redone"
    print(f"pipeline: killed {first:.0f} s in, after distill + dense training; "
          f"the re-run took {time.time() - t0:.0f} s "
          f"and redid none of the {len(stamps)} finished stage dirs")


class _SmallDisk:
    """A real 64 KB filesystem (tmpfs; read-only with ro=True) where the machine lets us mount one. Elsewhere
    the same failures come from the kernel another way: a file-size limit (EFBIG) for a full disk and a
    read-only directory (EACCES) for permissions."""

    def __init__(self, path: Path, ro: bool = False):
        self.path, self.ro = path, ro
        path.mkdir()
        opts = "size=64k" + (",ro" if ro else "")
        self.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                      capture_output=True).returncode == 0
        if not self.mounted and ro:
            path.chmod(0o555)

    def preexec(self):
        if not self.mounted and not self.ro:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    def close(self):
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=True)
        self.path.chmod(0o755)


def _error_lines(r) -> list[str]:
    """The error lines of a run (progress bars share stderr, and carriage returns split their updates)."""
    lines = r.stderr.replace("\r", "\n").splitlines()
    return [line[line.index("sd2: error:"):] for line in lines if "sd2: error:" in line]


def _run_on(disk: _SmallDisk, args: list[str]):
    return subprocess.run([*SD2, *args], env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=disk.preexec)


def test_disk_full_is_one_line_naming_the_path_and_keeps_finished_work(tiny_model_dir, seed_file, tmp_path):
    disk = _SmallDisk(tmp_path / "small")
    try:
        out = disk.path / "pruned"
        r = _run_on(disk, ["prune", "--model", str(tiny_model_dir), "--method", "magnitude", "--sparsity", "0.5",
                           "--out", str(out)])
        assert r.returncode == 2, r.stderr[-2000:]
        [err] = _error_lines(r)
        assert err.startswith(f"sd2: error: {out}: ") and ("No space left" in err or "too large" in err), err
        assert "Traceback" not in r.stderr and list(disk.path.iterdir()) == []  # nothing half-written

        # distillation: the shards (5 files of ~5 KB) fit, the final dataset (one ~22 KB file) does not
        seeds = _prompts(tmp_path, n=80, chars=200)
        data = disk.path / "data"
        r = _run_on(disk, ["distill", "--target", str(tiny_model_dir), "--prompts", str(seeds),
                           "--max-new-tokens", "8", "--shard-size", "16", "--threads", "1", "--out", str(data)])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert _error_lines(r) == [_error_lines(r)[0]] and _error_lines(r)[0].startswith(f"sd2: error: {data}: ")
        assert not data.exists() and not (disk.path / ".data.tmp").exists()
        shards = sorted((disk.path / "data.partial" / "shards").glob("shard-*.jsonl"))
        assert len(shards) == 5, "finished shards were lost"
        big = tmp_path / "big"
        shutil.copytree(disk.path / "data.partial", big / "data.partial")
    finally:
        disk.close()
    # with room again (the same shards on a big disk), the same command finishes from them, redoing none
    before = {f.name: f.stat().st_mtime_ns for f in (big / "data.partial" / "shards").glob("*.jsonl")}
    r = subprocess.run([*SD2, "distill", "--target", str(tiny_model_dir), "--prompts", str(seeds),
                        "--max-new-tokens", "8", "--shard-size", "16", "--threads", "1", "--out", str(big / "data")],
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = datasets.load_from_disk(str(big / "data"))
    assert len(ds) == 80
    assert "generated_tokens_per_s_this_run" in json.loads((big / "data" / "sd2_manifest.json").read_text())
    assert json.loads((big / "data" / "sd2_manifest.json").read_text())["generated_tokens"] == 0, before  # none redone


def test_permission_denied_is_one_line_naming_the_path(tiny_model_dir, tmp_path):
    disk = _SmallDisk(tmp_path / "locked", ro=True)
    try:
        out = disk.path / "e.json"
        r = _run_on(disk, ["eval", "--target", str(tiny_model_dir), "--drafter", str(tiny_model_dir), "--prompts",
                           str(_prompts(tmp_path)), "--limit", "1", "--max-new-tokens", "4", "--out", str(out)])
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        [err] = _error_lines(r)
        assert err.startswith(f"sd2: error: {out}: ") and ("Read-only" in err or "Permission denied" in err), err
    finally:
        disk.close()


def _prompts(tmp_path: Path, n: int = 1, chars: int = 12) -> Path:
    f = tmp_path / f"prompts-{n}.jsonl"
    f.write_text("".join(json.dumps({"prompt": (f"{i} the lazy dog " * chars)[:chars]}) + "\n" for i in range(n)))
    return f
