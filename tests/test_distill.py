import json

import datasets
import pytest
from typer.testing import CliRunner

import sd2.distill as distill_mod
from sd2.cli import app
from sd2.config import DistillConfig
from sd2.distill import REWRITE_TEMPLATE, distill, is_degenerate, request_text
from sd2.data import read_prompts
from sd2.errors import UserError


def _cfg(model, seeds, out, **kw):
    base = dict(target=str(model), prompts=str(seeds), out=out, max_new_tokens=6, batch_size=2, shard_size=3)
    base.update(kw)
    return DistillConfig(**base)


def test_regenerate_dataset_and_manifest(tiny_model_dir, seed_file, tmp_path):
    out = distill(_cfg(tiny_model_dir, seed_file, tmp_path / "ds"), progress=False)
    ds = datasets.load_from_disk(str(out))
    assert {"prompt", "response", "source_id"} <= set(ds.column_names)
    m = json.loads((out / "sd2_manifest.json").read_text())
    assert m["mode"] == "regenerate" and len(m["target_digest"]) == 64 and len(m["prompts_digest"]) == 64
    c = m["counts"]
    assert c["seed_records"] == 10 and c["kept"] == len(ds)
    assert c["kept"] + c["empty"] + c["degenerate"] + c["duplicate"] == 10
    assert not (tmp_path / "ds.partial").exists()
    assert all(t for t in ds["truncated"])  # 6 new tokens from a random model: all hit the limit, kept + flagged


def test_resume_after_interruption_equals_uninterrupted(tiny_model_dir, seed_file, tmp_path, monkeypatch):
    full = datasets.load_from_disk(str(distill(_cfg(tiny_model_dir, seed_file, tmp_path / "a"), progress=False)))
    real = distill_mod.generate_batch
    calls = {"n": 0}

    def dies_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(distill_mod, "generate_batch", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        distill(_cfg(tiny_model_dir, seed_file, tmp_path / "b"), progress=False)
    assert not (tmp_path / "b").exists()
    assert len(list((tmp_path / "b.partial" / "shards").glob("*.jsonl"))) == 1  # first shard (2 batches) kept
    monkeypatch.setattr(distill_mod, "generate_batch", real)
    with pytest.raises(UserError, match="other arguments"):
        distill(_cfg(tiny_model_dir, seed_file, tmp_path / "b", max_new_tokens=7), progress=False)
    resumed = datasets.load_from_disk(str(distill(_cfg(tiny_model_dir, seed_file, tmp_path / "b"), progress=False)))
    assert resumed.to_list() == full.to_list()


def test_rewrite_never_leaks_reference(tiny_model_dir, seed_file, tmp_path):
    seeds = read_prompts(seed_file)
    shown = request_text(seeds[0], "rewrite")
    assert seeds[0].reference in shown and seeds[0].text in shown
    out = distill(_cfg(tiny_model_dir, seed_file, tmp_path / "rw", mode="rewrite"), progress=False)
    ds = datasets.load_from_disk(str(out))
    by_id = {p.id: p for p in seeds}
    for row in ds:
        assert row["prompt"] == by_id[row["source_id"]].text
        assert by_id[row["source_id"]].reference not in row["prompt"]
        assert "reference answer" not in row["prompt"]
    assert REWRITE_TEMPLATE.split("{")[0] == ""


def test_reference_mode_is_plain_sft_data(seed_file, tmp_path):
    out = distill(_cfg("unused-target", seed_file, tmp_path / "ref", mode="reference"), progress=False)
    ds = datasets.load_from_disk(str(out))
    assert ds[0]["response"] == "the quick brown fox 0 jumps over the lazy dog."


def test_degenerate_filter():
    assert is_degenerate([1, 2, 3, 4] * 20)
    assert not is_degenerate(list(range(80)))


def test_distill_cli_bad_input(tiny_model_dir, seed_file, tmp_path):
    r = CliRunner()
    nonempty = tmp_path / "exists"
    nonempty.mkdir()
    (nonempty / "f").write_text("x")
    cases = [
        (["--prompts", str(tmp_path / "nope.jsonl")], "not found"),
        (["--prompts", str(seed_file), "--mode", "paraphrase"], "mode"),
        (["--prompts", str(seed_file), "--batch-size", "0"], "batch-size"),
        (["--prompts", str(seed_file), "--store-topk", "8", "--mode", "reference"], "--store-topk 8"),
        (["--prompts", str(seed_file), "--store-topk", "8", "--backend", "openai", "--base-url",
          "http://127.0.0.1:9"], "--store-topk 8"),
        (["--prompts", f"{seed_file}+magpie:2", "--mode", "rewrite"], "magpie"),
        (["--prompts", f"{seed_file}+magpie"], "how many"),
        (["--prompts", str(seed_file), "--magpie-openers", "tasks"], "--magpie-openers tasks"),
        (["--prompts", f"{seed_file}+magpie:2", "--magpie-openers", "code"], "magpie-openers"),
    ]
    for args, needle in cases:
        res = r.invoke(app, ["distill", "--target", str(tiny_model_dir), "--out", str(tmp_path / "o"), *args])
        assert res.exit_code == 2 and needle in res.output, res.output
        assert not (tmp_path / "o").exists()
    res = r.invoke(app, ["distill", "--target", str(tiny_model_dir), "--prompts", str(seed_file),
                         "--out", str(nonempty)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    res = r.invoke(app, ["distill", "--target", str(tiny_model_dir), "--prompts", str(empty),
                         "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no records" in res.output
    gsm = tmp_path / "noref.jsonl"
    gsm.write_text('{"prompt": "hi"}\n')
    res = r.invoke(app, ["distill", "--target", str(tiny_model_dir), "--prompts", str(gsm), "--mode", "rewrite",
                         "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no reference" in res.output


def test_generate_batch_drops_finished_rows_and_equals_hf_generate(tiny_model_dir):
    """Rows leave the batch at their EOS; greedy rows still equal transformers' generate, row by row, with
    left padding and prompts of several lengths; sampling is reproducible by seed."""
    import torch

    from sd2.distill import generate_batch
    from sd2.models import load_model

    model, tok = load_model(str(tiny_model_dir))
    encoded = [tok("a b c d e f g")["input_ids"], tok("x")["input_ids"], tok("the quick fox")["input_ids"]]
    width, pad = max(map(len, encoded)), tok.eos_token_id  # what generate_batch pads with when there is no pad
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(e) for e in encoded])[:, None]).long()
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                          pad_token_id=pad)[:, width:].tolist()
    # a token one row emits early becomes an EOS, so that row finishes while the others go on
    stop = free[0][3]
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         pad_token_id=pad)[:, width:].tolist()
    rows = generate_batch(model, tok, [""] * 3, encoded=encoded, max_new_tokens=12, temperature=0.0, seed=0)
    for (text, toks, truncated, _), want in zip(rows, ref):
        cut = next((i for i, t in enumerate(want) if t in (tok.eos_token_id, stop)), len(want))
        assert toks == want[:cut]
        assert truncated == (cut == 12)
    assert len(rows[0][1]) < 12 and any(r[2] for r in rows)  # one row ended early, another ran to the cap
    a = generate_batch(model, tok, [""] * 3, encoded=encoded, max_new_tokens=8, temperature=1.0, seed=5)
    b = generate_batch(model, tok, [""] * 3, encoded=encoded, max_new_tokens=8, temperature=1.0, seed=5)
    assert [r[1] for r in a] == [r[1] for r in b]
