"""bench/specdec.py with a drafter of another tokenizer (Universal Assisted Generation) on the path a target the lean
engine cannot run gets (fp16-weight HF modules, the Llama drafter on the lean engine): it runs end to end, both
sides (sd2's engine and HF's assisted generation with `assistant_tokenizer`) stay lossless, and every comparison
the issue asks for is in the report."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import make_llama

ROOT = Path(__file__).resolve().parents[1]


def test_bench_compares_uag_with_hf_on_the_mixed_path(tmp_path, tok300, tok400):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sd2.models import save_model

    torch.manual_seed(0)
    eos = tok400.eos_token_id
    target = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok400), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          eos_token_id=eos, tie_word_embeddings=False)).eval()
    save_model(target, tok400, tmp_path / "target")
    save_model(make_llama(len(tok300), seed=3, eos=tok300.eos_token_id), tok300, tmp_path / "drafter")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "specdec.py"), "--target", str(tmp_path / "target"),
                        "--drafter", str(tmp_path / "drafter"), "--paths", "fp16-lean-drafter", "--limit", "2",
                        "--max-new-tokens", "8", "--repeats", "1", "--draft-threshold", "0.3", "--lookup", "2",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["other_tokenizer"] == [str(tmp_path / "drafter")]
    (path,) = rep["paths"]
    assert path["path"] == "fp16-lean-drafter" and path["lookup"]["lossless"]
    d = path["drafters"][str(tmp_path / "drafter")]
    assert d["lossless"] and d["dynamic"]["lossless"] and d["lookup"]["lossless"]
    assert d["sd2_vs_hf_assisted"] > 0 and d["mal_hf_assisted"] >= 1 and d["dynamic"]["sd2_vs_hf"] > 0
    assert d["drafter_time_ratio"] > 0 and d["verify_cost_ratio"] > 0
    assert path["drafters"]["self-draft"]["lossless"]
    assert "| fp16-lean-drafter |" in r.stdout  # the table
