import json
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from typer.testing import CliRunner

from sd2.cli import app
from sd2.config import TrainConfig
from sd2.models import load_model, save_model
from sd2.train import SparsityMasks, build_examples, kd_loss, sft_loss, train
from tests.conftest import make_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rows = [{"prompt": f"the quick fox {i}", "response": "jumps over the lazy dog. " * (1 + i % 3), "source_id": str(i)}
            for i in range(48)]
    d = tmp_path_factory.mktemp("data") / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(d))
    return d


@pytest.fixture(scope="module")
def sparse_init(tmp_path_factory, tok300):
    """A tiny model with half of every decoder linear weight zeroed (a 50%-sparse drafter)."""
    m = make_llama(len(tok300), layers=2, seed=3, eos=tok300.eos_token_id, hidden=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight[torch.rand(mod.weight.shape, generator=g) < 0.5] = 0
    d = tmp_path_factory.mktemp("sparse") / "model"
    save_model(m, tok300, d)
    return d


def _cfg(init, data, out, **kw):
    base = dict(init=str(init), data=data, out=out, max_steps=10, batch_size=4, seq_len=64, lr=2e-3, save_steps=5,
                threads=1, warmup_ratio=0.0)
    base.update(kw)
    return TrainConfig(**base)


def _zeros(model_dir):
    m, _ = load_model(str(model_dir))
    return {n: (mod.weight == 0) for n, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in n}


def test_loss_decreases_and_output_is_plain_hf(tiny_model_dir, data_dir, tmp_path):
    out = train(_cfg(tiny_model_dir, data_dir, tmp_path / "m", max_steps=20), progress=False)
    info = json.loads((out / "sd2_train.json").read_text())
    losses = [h["loss"] for h in info["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] - 0.5
    assert not list(out.glob("*.bin")) and (out / "model.safetensors").exists()
    transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers can load it
    assert not (tmp_path / "m.partial").exists()


def test_response_only_labels(tok300):
    ds = [{"prompt": "the quick fox", "response": "jumps"}]
    (ex,), counts = build_examples(ds, tok300, 64)
    n_prompt = len(tok300("the quick fox")["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == tok300.eos_token_id
    (short,), counts = build_examples(ds, tok300, 6)  # a prompt over half of seq_len keeps its last tokens
    assert counts["prompt_truncated"] == 1 and len(short["input_ids"]) == 6 and short["labels"][3:] != [-100] * 3
    # an answer cut at the token limit gets no EOS, read from ids (same tokenizer) or re-tokenized (another one)
    cut = [{"prompt": "the quick fox", "response": "jumps", "truncated": True,
            "response_ids": tok300.encode("jumps", add_special_tokens=False)}]
    for use_ids in (True, False):
        (ex,), _ = build_examples(cut, tok300, 64, use_ids=use_ids)
        assert ex["labels"][-1] != tok300.eos_token_id and ex["input_ids"][n_prompt:] == cut[0]["response_ids"]


def test_resume_continues_same_step_count(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    ref = train(_cfg(tiny_model_dir, data_dir, tmp_path / "ref"), progress=False)
    real_step = transformers.Trainer.training_step

    def crash_after_checkpoint(self, *a, **k):
        if self.state.global_step == 7:
            raise KeyboardInterrupt("simulated kill after checkpoint-5")
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, data_dir, tmp_path / "r"), progress=False)
    assert (tmp_path / "r.partial" / "checkpoints" / "checkpoint-5").is_dir() and not (tmp_path / "r").exists()
    steps_run = []

    def counting(self, *a, **k):
        steps_run.append(self.state.global_step)
        return real_step(self, *a, **k)

    monkeypatch.setattr(transformers.Trainer, "training_step", counting)
    with pytest.raises(Exception, match="--resume"):
        train(_cfg(tiny_model_dir, data_dir, tmp_path / "r"), progress=False)
    out = train(_cfg(tiny_model_dir, data_dir, tmp_path / "r", resume=True), progress=False)
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["global_step"] == 10
    assert steps_run == [5, 6, 7, 8, 9]  # continued after checkpoint-5, did not restart at 0
    assert [h["step"] for h in info["log_history"] if "loss" in h] == list(range(1, 11))
    a, _ = load_model(str(ref))
    b, _ = load_model(str(out))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-3, msg=n)


def test_masks_kept_in_process(sparse_init, data_dir, tmp_path):
    before = _zeros(sparse_init)
    out = train(_cfg(sparse_init, data_dir, tmp_path / "s"), progress=False)
    after = _zeros(out)
    for name, z in before.items():
        assert torch.equal(z, after[name]), name
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["regrown"] == 0 and info["masked_layers"] == len(before) and 0.45 < info["mask_density"] < 0.55
    m0, _ = load_model(str(sparse_init))
    m1, _ = load_model(str(out))
    assert not torch.equal(m0.model.layers[0].mlp.up_proj.weight, m1.model.layers[0].mlp.up_proj.weight)


@pytest.mark.slow
def test_deepspeed_zero2_two_cpu_ranks_keeps_masks(sparse_init, data_dir, tmp_path):
    """The real DeepSpeed path: ZeRO-2 on 2 gloo CPU ranks, launched as a torchrun subprocess."""
    before = _zeros(sparse_init)
    r = CliRunner().invoke(app, ["train", "--init", str(sparse_init), "--data", str(data_dir), "--out",
                                 str(tmp_path / "ds"), "--max-steps", "6", "--batch-size", "4", "--seq-len", "64",
                                 "--lr", "2e-3", "--deepspeed", str(ROOT / "infra/deepspeed/zero2.json"),
                                 "--num-gpus", "2", "--cpu-fallback", "--threads", "1", "--save-steps", "100"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "ds" / "sd2_train.json").read_text())
    assert info["zero_stage"] == 2 and info["world_size"] == 2 and "DEEPSPEED" in info["distributed_type"]
    after = _zeros(tmp_path / "ds")
    for name, z in before.items():
        assert torch.equal(z, after[name]), name
    m1, _ = load_model(str(tmp_path / "ds"))
    m0, _ = load_model(str(sparse_init))
    assert not torch.equal(m0.model.layers[1].self_attn.q_proj.weight, m1.model.layers[1].self_attn.q_proj.weight)


def test_sft_loss_is_the_mean_over_response_positions_and_zero_without_any():
    """A packed block of prompt tokens only (no labels) must not put NaN into the gradients."""
    logits = torch.randn(2, 7, 50, requires_grad=True)
    labels = torch.full((2, 7), -100)
    labels[:, 4:] = 3
    ref = torch.nn.functional.cross_entropy(logits[:, 3:6].reshape(-1, 50), torch.full((6,), 3))
    assert sft_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-5)
    none = sft_loss(logits, torch.full((2, 7), -100))
    none.backward()
    assert none.item() == 0 and torch.isfinite(logits.grad).all()


def test_kd_loss_zero_for_identical_and_trains(tiny_model_dir, data_dir, tmp_path):
    logits = torch.randn(2, 7, 50)
    labels = torch.full((2, 7), 3)
    labels[:, :3] = -100
    for div in ("fkl", "tv"):
        assert kd_loss(logits, logits, labels, div).item() == pytest.approx(0.0, abs=1e-6)
        assert kd_loss(logits, torch.randn(2, 7, 50), labels, div).item() > 0.01
    out = train(_cfg(tiny_model_dir, data_dir, tmp_path / "kd", loss="kd", kd_target=str(tiny_model_dir),
                     max_steps=2, lr=1e-9), progress=False)
    info = json.loads((out / "sd2_train.json").read_text())
    assert info["train_loss"] == pytest.approx(0.0, abs=1e-4)  # drafter == teacher


def test_layer_kd_adds_the_per_layer_loss_and_keeps_masks(tiny_model_dir, sparse_init, data_dir, tmp_path):
    """--layer-kd: zero for a drafter equal to its teacher; on a sparse copy it adds a positive per-layer term to
    the same first-step loss (same seed, same batch) and the masks survive."""
    same = train(_cfg(tiny_model_dir, data_dir, tmp_path / "same", loss="kd", kd_target=str(tiny_model_dir),
                      layer_kd=1.0, max_steps=2, lr=1e-9), progress=False)
    assert json.loads((same / "sd2_train.json").read_text())["train_loss"] == pytest.approx(0.0, abs=1e-4)
    first = {}
    for w in (0.0, 1.0):
        out = train(_cfg(sparse_init, data_dir, tmp_path / f"w{w:g}", kd_target=str(tiny_model_dir), layer_kd=w,
                         max_steps=4), progress=False)
        hist = json.loads((out / "sd2_train.json").read_text())["log_history"]
        first[w] = next(h["loss"] for h in hist if "loss" in h)
    assert first[1.0] > first[0.0] + 1e-3
    after = _zeros(tmp_path / "w1")
    for name, z in _zeros(sparse_init).items():
        assert torch.equal(z, after[name]), name


def test_masks_detects_zeros():
    m = make_llama(64)
    assert not SparsityMasks.from_model(m)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[:, :4] = 0
    sm = SparsityMasks.from_model(m)
    assert list(sm.masks) == ["model.layers.0.mlp.up_proj"]


def test_train_bad_input(tiny_model_dir, data_dir, tmp_path, tok300):
    r = CliRunner()
    deeper = save_model(make_llama(len(tok300), layers=3, hidden=64, eos=tok300.eos_token_id), tok300,
                        tmp_path / "deeper")
    base = ["train", "--init", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    bad_json = tmp_path / "ds.json"
    bad_json.write_text("{ not json")
    nocol = tmp_path / "nocol"
    datasets.Dataset.from_list([{"text": "x"}]).save_to_disk(str(nocol))
    cases = [
        (["--data", str(tmp_path / "nodata")], "not a directory"),
        (["--data", str(nocol)], "missing column"),
        (["--data", str(data_dir), "--deepspeed", str(bad_json)], "invalid JSON"),
        (["--data", str(data_dir), "--num-gpus", "4"], "--cpu-fallback"),
        (["--data", str(data_dir), "--draft-vocab", "1000000"], "--draft-vocab"),
        (["--data", str(data_dir), "--loss", "kd", "--kd-teacher", "stored"], "--kd-teacher stored"),
        (["--data", str(data_dir), "--loss", "mse"], "loss"),
        (["--data", str(data_dir), "--layer-kd", "1", "--kd-target", str(deeper)], "--layer-kd"),
        (["--data", str(data_dir), "--layer-kd", "1"], "--layer-kd: pass --kd-target"),
        (["--data", str(data_dir), "--shared-kv", "--kd-target", str(deeper)],
         "--shared-kv: the drafter cannot read the target's KV cache (layers 2 vs the target's 3, and no map"),
    ]
    for args, needle in cases:
        res = r.invoke(app, [*base, *args])
        assert res.exit_code == 2 and needle in res.output, (args, res.output)
        assert not (tmp_path / "o").exists()


def test_stray_zeros_are_not_masks_but_recorded_layers_are():
    m = make_llama(64, hidden=64)
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, :3] = 0  # 3 of 8192: a dequantization artefact
    assert not SparsityMasks.from_model(m)
    sm = SparsityMasks.from_model(m, pruned_layers={"model.layers.0.mlp.up_proj"})
    assert list(sm.masks) == ["model.layers.0.mlp.up_proj"]


def test_packing_fills_blocks_and_keeps_label_masks(tok300):
    ds = [{"prompt": f"the quick fox {i}", "response": "jumps over the lazy dog"} for i in range(10)]
    plain, _ = build_examples(ds, tok300, 64)
    packed, _ = build_examples(ds, tok300, 16, packing=True)
    total = sum(len(e["input_ids"]) for e in plain)
    assert sum(len(e["input_ids"]) for e in packed) == total
    assert all(len(e["input_ids"]) == 16 for e in packed[:-1])
    flat_labels = [t for e in packed for t in e["labels"]]
    assert flat_labels == [t for e in plain for t in e["labels"]]
