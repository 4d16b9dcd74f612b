import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from sd2.cli import app
from sd2.errors import UserError
from sd2.models import load_model, save_model
from sd2.prune import prune_model
from sd2.prune.allocate import owl_sparsities
from sd2.prune.layers import choose_layers, keep_layers, layer_block_distances, layers_for_macs
from sd2.prune.magnitude import prune_magnitude
from sd2.prune.masks import nm_prune_mask, parse_pattern, satisfies_nm, unstructured_prune_mask
from sd2.prune.sparsegpt import HessianStats, prune_sparsegpt
from sd2.prune.wanda import WandaStats, prune_wanda
from sd2.metrics import macs_per_token
from tests.conftest import make_llama

runner = CliRunner()


def _correlated_inputs(n=2048, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, d, generator=g)
    scales = torch.logspace(-1, 1, d)[torch.randperm(d, generator=g)]
    return (base @ mix + 0.3 * torch.randn(n, d, generator=g)) * scales


@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_groups(nm):
    n, m = nm
    w = torch.randn(16, 64)
    mask = nm_prune_mask(w.abs(), n, m)
    w[mask] = 0
    assert satisfies_nm(w, n, m)
    assert int((w != 0).sum()) == 16 * 64 * n // m


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_unstructured_ratio(s):
    w = torch.randn(48, 96)
    assert int(unstructured_prune_mask(w.abs(), s).sum()) == int(w.numel() * s)
    per_row = unstructured_prune_mask(w.abs(), s, per_row=True)
    assert (per_row.sum(1) == int(96 * s)).all()


def _recon_errors(sparsity, nm=None):
    X = _correlated_inputs()
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    ref = X @ W.T
    errs = {}
    for name in ("sparsegpt", "wanda", "magnitude"):
        w = W.clone()
        if name == "sparsegpt":
            st = HessianStats(64)
            for chunk in X.split(256):
                st.add(chunk)
            prune_sparsegpt(w, st, sparsity, nm, blocksize=16)
        elif name == "wanda":
            st = WandaStats(64)
            st.add(X)
            prune_wanda(w, st, sparsity, nm)
        else:
            prune_magnitude(w, sparsity, nm)
        frac = 1 - int((w != 0).sum()) / w.numel()
        assert frac == pytest.approx(sparsity if nm is None else 1 - nm[0] / nm[1], abs=0.02)
        if nm:
            assert satisfies_nm(w, *nm)
        errs[name] = float(((X @ w.T - ref) ** 2).sum())
    return errs


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.7, None), (0.5, (2, 4))])
def test_reconstruction_order(sparsity, nm):
    e = _recon_errors(sparsity, nm)
    assert e["sparsegpt"] <= e["wanda"] <= e["magnitude"], e


def test_sparsegpt_zero_sparsity_is_identity():
    X = _correlated_inputs(256)
    W = torch.randn(16, 64)
    st = HessianStats(64)
    st.add(X)
    w = W.clone()
    prune_sparsegpt(w, st, 0.0)
    assert torch.equal(w, W)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok300):
    d = tmp_path_factory.mktemp("prunemodel") / "m"
    save_model(make_llama(len(tok300), layers=3, seed=2, eos=tok300.eos_token_id, hidden=64), tok300, d)
    return d


@pytest.mark.parametrize("method,pattern,sparsity", [("sparsegpt", "unstructured", 0.5), ("wanda", "2:4", None),
                                                      ("magnitude", "unstructured", 0.7), ("sparsegpt", "4:8", None)])
def test_prune_cli_roundtrip(tiny_dir, seed_file, tmp_path, method, pattern, sparsity):
    out = tmp_path / "p"
    args = ["prune", "--model", str(tiny_dir), "--method", method, "--pattern", pattern, "--out", str(out),
            "--calib", str(seed_file), "--calib-samples", "8", "--seq-len", "32"]
    if sparsity is not None:
        args += ["--sparsity", str(sparsity)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "sparsity.json").read_text())
    m = transformers.AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    expected = sparsity if sparsity is not None else 0.5
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            nnz = int((mod.weight != 0).sum())
            key = name.split("model.", 1)[1]
            assert rep["layers"]["model." + key]["nonzeros"] == nnz
            assert 1 - nnz / mod.weight.numel() == pytest.approx(expected, abs=0.01)
            if pattern != "unstructured":
                assert satisfies_nm(mod.weight, *parse_pattern(pattern))
    assert int((m.lm_head.weight != 0).sum()) == m.lm_head.weight.numel()  # lm_head left dense


def test_prune_bad_input(tiny_dir, seed_file, tmp_path):
    out = tmp_path / "bad"
    base = ["prune", "--model", str(tiny_dir), "--out", str(out)]
    cases = [
        (["--method", "wanda", "--sparsity", "1.0", "--calib", str(seed_file)], "--sparsity"),
        (["--method", "wanda", "--sparsity", "-0.1", "--calib", str(seed_file)], "--sparsity"),
        (["--method", "wanda", "--pattern", "4:2", "--calib", str(seed_file)], "N < M"),
        (["--method", "wanda", "--pattern", "2:5", "--calib", str(seed_file)], "does not divide"),
        (["--method", "obs", "--sparsity", "0.5"], "--method"),
        (["--method", "wanda", "--pattern", "blocky", "--sparsity", "0.5"], "--pattern"),
        (["--method", "wanda", "--sparsity", "0.5"], "--calib"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", str(seed_file), "--calib-samples", "99"], "fewer"),
        (["--method", "magnitude", "--sparsity", "0.5", "--filter", "nomatch_xyz"], "matches no linear"),
        (["--method", "wanda", "--pattern", "2:4", "--calib", str(seed_file), "--allocation", "owl"], "N:M"),
        (["--method", "magnitude", "--sparsity", "0.5", "--allocation", "owl"], "calibration"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", str(seed_file), "--allocation", "owls"],
         "--allocation"),
        (["--method", "wanda", "--sparsity", "0.5", "--calib", str(seed_file), "--allocation", "owl",
          "--owl-lambda", "0.6"], "--owl-lambda"),
        (["--method", "wanda", "--sparsity", "0.9", "--calib", str(seed_file), "--calib-samples", "8",
          "--allocation", "owl", "--owl-lambda", "0.2"], "smaller lambda"),
    ]
    for args, needle in cases:
        r = runner.invoke(app, base + args)
        assert r.exit_code == 2 and needle in r.output, (args, r.output)
        assert not out.exists()


def test_owl_sparsities_keep_the_mean_and_spare_outlier_rich_layers():
    got = owl_sparsities([0.01, 0.03, 0.02], [10, 10, 20], 0.7, 0.1)
    assert sum(s * n for s, n in zip(got, [10, 10, 20])) / 40 == pytest.approx(0.7)
    assert got[1] < got[2] < got[0] and got[0] - got[1] == pytest.approx(0.2)  # spans 2·lambda
    assert owl_sparsities([0.02, 0.02], [5, 5], 0.6, 0.1) == pytest.approx([0.6, 0.6])  # nothing to tell apart
    assert owl_sparsities([0.01, 0.03], [5, 5], 0.6, 0.0) == pytest.approx([0.6, 0.6])


def test_owl_prunes_layers_unevenly_at_the_same_nonzeros(tiny_dir, seed_file, tmp_path):
    """`--allocation owl`: per-layer sparsities differ (sparsity.json lists them), the total nonzeros are those of
    uniform pruning, and the layer richest in outlier scores keeps the most weights."""
    reps = {}
    for alloc in ("uniform", "owl"):
        out = tmp_path / alloc
        r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "sparsegpt", "--sparsity", "0.6",
                                "--out", str(out), "--calib", str(seed_file), "--calib-samples", "8", "--seq-len", "32",
                                "--allocation", alloc, "--owl-lambda", "0.1", "--owl-m", "3"])
        assert r.exit_code == 0, r.output
        reps[alloc] = json.loads((out / "sparsity.json").read_text())
    owl = reps["owl"]
    assert owl["allocation"] == "owl" and len(owl["layer_sparsity"]) == 3
    assert max(owl["layer_sparsity"]) - min(owl["layer_sparsity"]) == pytest.approx(0.2, abs=1e-3)
    nnz = {a: sum(v["nonzeros"] for v in rep["layers"].values()) for a, rep in reps.items()}
    assert nnz["owl"] == pytest.approx(nnz["uniform"], rel=0.01)
    for i, s in enumerate(owl["layer_sparsity"]):
        got = [v for k, v in owl["layers"].items() if k.startswith(f"model.layers.{i}.")]
        assert sum(v["total"] - v["nonzeros"] for v in got) / sum(v["total"] for v in got) == pytest.approx(s, abs=0.01)


def _q_proj_input(model, layer, ids):
    got = []
    h = model.model.layers[layer].self_attn.q_proj.register_forward_hook(lambda m, i, o: got.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    h.remove()
    return got[0]


def test_sequential_calibration_sees_pruned_inputs(tiny_dir, tok300):
    """Layer 1's statistics come from the outputs of the already-pruned layer 0, not of the dense one."""
    m, _ = load_model(str(tiny_dir))
    dense, _ = load_model(str(tiny_dir))
    ids = tok300("the quick brown fox jumps")["input_ids"]
    seen = []
    orig = WandaStats.add

    def spy(self, x):
        seen.append(x.detach().clone())
        orig(self, x)

    WandaStats.add = spy
    try:
        prune_model(m, "wanda", 0.5, samples=[ids], progress=False)
    finally:
        WandaStats.add = orig
    per_layer = 7  # q, k, v, o, gate, up, down for one sample
    layer1_q = seen[per_layer]
    torch.testing.assert_close(layer1_q, _q_proj_input(m, 1, ids))  # = input under the pruned layer 0
    assert not torch.allclose(layer1_q, _q_proj_input(dense, 1, ids), atol=1e-4)
    assert all((m.model.layers[i].mlp.up_proj.weight == 0).float().mean() > 0.45 for i in range(3))


def _planted(tok_len: int):
    """A 6-layer model whose layers 2-3 are near-identities (tiny output projections): the redundant block."""
    m = make_llama(tok_len, layers=6, seed=4, hidden=64, std=0.2)
    with torch.no_grad():
        for i in (2, 3):
            m.model.layers[i].self_attn.o_proj.weight.mul_(1e-4)
            m.model.layers[i].mlp.down_proj.weight.mul_(1e-4)
    return m


def test_angular_finds_planted_block(tok300):
    m = _planted(len(tok300))
    samples = [tok300(t)["input_ids"] for t in ("the quick brown fox", "speculative decoding drafts tokens")]
    d = layer_block_distances(m, samples, 2)
    assert min(range(len(d)), key=d.__getitem__) == 2
    assert choose_layers(m, 4, "angular", samples) == [0, 1, 4, 5]
    assert choose_layers(m, 4, "first") == [0, 1, 2, 5]
    with pytest.raises(UserError):
        choose_layers(m, 6, "first")


def test_match_macs(tok300):
    m = make_llama(len(tok300), layers=8, hidden=64)
    target = macs_per_token(keep_layers(m, [0, 1, 2, 7]))["macs_per_token"]
    assert layers_for_macs(m, target) == 4


def test_layer_prune_cli_strategies(tiny_dir, seed_file, tmp_path):
    out = tmp_path / "lp"
    r = runner.invoke(app, ["layer-prune", "--model", str(tiny_dir), "--num-layers", "2", "--strategy", "angular",
                            "--calib", str(seed_file), "--calib-samples", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "sd2_layers.json").read_text())
    assert len(info["kept_layers"]) == 2 and info["strategy"] == "angular"
    r = runner.invoke(app, ["layer-prune", "--model", str(tiny_dir), "--match-macs", str(out), "--strategy", "first",
                            "--out", str(tmp_path / "mm")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "mm" / "sd2_layers.json").read_text())["kept_layers"] == [0, 2]
    r = runner.invoke(app, ["layer-prune", "--model", str(tiny_dir), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "exactly one" in r.output


def test_pruned_then_sparse_finetuned_keeps_nm(tiny_dir, seed_file, tmp_path):
    """End to end: `sd2 prune` 2:4 → `sd2 train --init <pruned>` → still 2:4 with the very same zeros."""
    import datasets

    pruned = tmp_path / "p24"
    r = runner.invoke(app, ["prune", "--model", str(tiny_dir), "--method", "sparsegpt", "--pattern", "2:4",
                            "--calib", str(seed_file), "--calib-samples", "4", "--seq-len", "32", "--out", str(pruned)])
    assert r.exit_code == 0, r.output
    data = tmp_path / "d"
    datasets.Dataset.from_list([{"prompt": f"fox {i}", "response": "jumps over the dog"} for i in range(16)]
                               ).save_to_disk(str(data))
    r = runner.invoke(app, ["train", "--init", str(pruned), "--data", str(data), "--out", str(tmp_path / "ft"),
                            "--max-steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
                            "--threads", "1"])
    assert r.exit_code == 0, r.output
    a, _ = load_model(str(pruned))
    b, _ = load_model(str(tmp_path / "ft"))
    changed = False
    for (n, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, torch.nn.Linear) and ".layers." in n:
            assert torch.equal(ma.weight == 0, mb.weight == 0), n
            assert satisfies_nm(mb.weight, 2, 4)
            changed |= not torch.equal(ma.weight, mb.weight)
    assert changed
