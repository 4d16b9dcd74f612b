"""Device placement: a pure function of (visible GPUs, model size, request), and every stage honouring --dtype on
the CPU (weights and saved files in that dtype, evaluation lossless within it)."""

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from sd2.cli import app
from sd2.device import Gpu, Placement, plan
from sd2.errors import UserError

GiB = 2**30
H100 = [Gpu(0, 80 * GiB, True, "H100"), Gpu(1, 80 * GiB, True, "H100")]
V100 = [Gpu(0, 16 * GiB, False, "V100")]
runner = CliRunner()


@pytest.mark.parametrize("request_, dtype, gpus, size, expect", [
    ("auto", "auto", [], None, Placement("cpu", "float32", workers=("cpu",))),
    ("auto", "auto", H100, None, Placement("cuda:0", "bfloat16", workers=("cuda:0", "cuda:1"))),
    ("auto", "auto", V100, None, Placement("cuda:0", "float16", workers=("cuda:0",))),
    ("cpu", "bfloat16", H100, None, Placement("cpu", "bfloat16", workers=("cpu",))),
    ("cuda:1", "float32", H100, None, Placement("cuda:1", "float32", workers=("cuda:1",))),
    ("cuda", "auto", H100, 10 * GiB, Placement("cuda:0", "bfloat16", workers=("cuda:0", "cuda:1"))),
    # 140 GiB of bf16 weights: spread over both GPUs (80% of each is the weights' budget)
    ("cuda", "auto", H100, 100 * GiB, Placement("cuda:0", "bfloat16", max_memory={0: 64 * GiB, 1: 64 * GiB},
                                                workers=("cuda:0",))),
])
def test_plan(request_, dtype, gpus, size, expect):
    assert plan(request_, dtype, gpus, size) == expect


@pytest.mark.parametrize("request_, dtype, gpus, size, workers, needle", [
    ("cuda", "auto", [], None, None, "no CUDA GPU is visible"),
    ("cuda:7", "auto", H100, None, None, "only 2 GPU(s) visible"),
    ("cuda", "bfloat16", V100, None, None, "no bfloat16 support"),
    ("cuda", "auto", H100, 200 * GiB, None, "more than the"),
    ("cuda:0", "auto", H100, 70 * GiB, None, "spread it over all GPUs"),
    ("cuda", "auto", H100, None, 3, "--workers 3"),
    ("tpu", "auto", H100, None, None, "use auto, cpu, cuda or cuda:N"),
    ("cpu", "fp8", [], None, None, "--dtype 'fp8'"),
])
def test_plan_refuses_what_cannot_run(request_, dtype, gpus, size, workers, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        plan(request_, dtype, gpus, size, workers)


def test_no_stage_hard_codes_a_device():
    """Stages resolve placement through sd2.device; none names "cuda" itself."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for f in [*root.glob("sd2/*.py"), *root.glob("sd2/prune/*.py"), *root.glob("tasks/*.py")]:
        if f.name == "device.py":
            continue
        text = f.read_text()
        assert '"cuda:0"' not in text and ".cuda()" not in text and 'device="cuda"' not in text, f


@pytest.mark.parametrize("args, needle", [
    (("eval", "--drafter", "x", "--out", "o.json", "--device", "cuda"), "no CUDA GPU is visible"),
    (("eval", "--drafter", "x", "--out", "o.json", "--device", "gpu"), "device: use auto, cpu, cuda or cuda:N"),
    (("eval", "--drafter", "x", "--out", "o.json", "--dtype", "fp8"), "dtype"),
    (("prune", "--model", "x", "--method", "magnitude", "--sparsity", "0.5", "--out", "o", "--device", "cuda:7"),
     "no CUDA GPU is visible"),
    (("layer-prune", "--model", "x", "--keep-layers", "0", "--out", "o", "--device", "cuda"), "no CUDA GPU"),
    (("distill", "--prompts", "p.jsonl", "--out", "o", "--device", "cuda"), "no CUDA GPU is visible"),
    (("train", "--init", "x", "--data", "d", "--out", "o", "--device", "cuda:1"), "device"),
])
def test_impossible_device_requests_are_one_line_exit_2(tmp_path, monkeypatch, tiny_model_dir, args, needle):
    monkeypatch.chdir(tmp_path)
    args = [str(tiny_model_dir) if a == "x" else a for a in args]
    res = runner.invoke(app, args)
    err = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(err) == 1 and needle in err[0], res.output
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())  # nothing written


def _dtypes(model_dir) -> set:
    out = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def test_every_stage_honours_bfloat16_on_cpu(tmp_path, tiny_model_dir, seed_file):
    """distill → layer-prune → train → prune → eval, all with --dtype bfloat16 on the CPU."""
    def run(*args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    bf = ("--device", "cpu", "--dtype", "bfloat16")
    run("distill", "--target", tiny_model_dir, "--prompts", seed_file, "--limit", 4, "--max-new-tokens", 6,
        "--out", tmp_path / "data", *bf)
    manifest = json.loads((tmp_path / "data" / "sd2_manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["device"] == "cpu, bfloat16"
    run("layer-prune", "--model", tiny_model_dir, "--keep-layers", "0,-1", "--out", tmp_path / "lp", *bf)
    assert _dtypes(tmp_path / "lp") == {"BF16"}
    run("train", "--init", tmp_path / "lp", "--data", tmp_path / "data", "--out", tmp_path / "tr",
        "--max-steps", 2, "--batch-size", 2, "--seq-len", 64, *bf)
    assert _dtypes(tmp_path / "tr") == {"BF16"}
    assert json.loads((tmp_path / "tr" / "sd2_train.json").read_text())["device"] == "cpu, bfloat16"
    run("prune", "--model", tmp_path / "tr", "--method", "sparsegpt", "--sparsity", 0.5, "--calib", tmp_path / "data",
        "--calib-samples", 2, "--seq-len", 32, "--out", tmp_path / "pr", *bf)
    assert _dtypes(tmp_path / "pr") == {"BF16"}
    assert json.loads((tmp_path / "pr" / "sparsity.json").read_text())["sparsity"] == pytest.approx(0.5, abs=0.01)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": "a", "turns": [f"the quick fox {i}"]}) + "\n"
                               for i in range(3)))
    run("eval", "--target", tiny_model_dir, "--drafter", tmp_path / "pr", "--prompts", prompts,
        "--max-new-tokens", 10, "--out", tmp_path / "e.json", *bf)
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["lossless"] is True and res["numeric_path"] == "bf16, lean engine"  # auto keeps the dtype


def test_two_distill_workers_make_the_single_worker_dataset(tmp_path, tiny_model_dir, seed_file):
    """Shards dealt to 2 worker processes (CPU here, one per GPU on a GPU node) merge into the same dataset."""
    import datasets

    from sd2.config import DistillConfig
    from sd2.distill import distill

    common = dict(target=str(tiny_model_dir), prompts=str(seed_file), max_new_tokens=8, shard_size=3, batch_size=2,
                  device="cpu")
    one = distill(DistillConfig(out=tmp_path / "one", **common), progress=False)
    two = distill(DistillConfig(out=tmp_path / "two", workers=2, **common), progress=False)
    a, b = datasets.load_from_disk(str(one)), datasets.load_from_disk(str(two))
    assert a.to_list() == b.to_list() and len(a) >= 8
    assert json.loads((two / "sd2_manifest.json").read_text())["workers"] == 2


def test_bf16_weights_load_as_requested(tiny_model_dir):
    from sd2.models import load_model

    m, _ = load_model(str(tiny_model_dir), placement=Placement("cpu", "bfloat16"))
    assert next(m.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("native, expect", [(True, "bfloat16"), (False, "float32")])
def test_fast_train_dtype_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, native, expect):
    """`train_dtype: fast` (the sparse recipe's): bf16 mixed precision on an AVX-512 BF16 / AMX CPU, fp32 on one
    that would emulate bf16 (≈ 8× slower than fp32 on an AVX2-only core)."""
    from sd2 import device
    from sd2.config import PipelineConfig, SweepConfig, SweepGrid

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(device, "visible_gpus", lambda: [])
    assert PipelineConfig(train_dtype="fast").resolved().train_settings(10).dtype == expect
    grid = SweepGrid(methods=["magnitude"], patterns=["unstructured"], sparsities=[0.5])
    assert SweepConfig(drafter="d", data="x", sweep=grid, train_dtype="fast").train_settings().dtype == expect
    assert device.train_dtype(None, "float32") == "float32" and device.train_dtype("bfloat16", "auto") == "bfloat16"
    assert device.train_dtype("fast", "float32", "cuda:0") == "auto"  # bf16, or fp16 on a GPU without bf16 (plan)
