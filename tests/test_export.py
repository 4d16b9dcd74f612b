"""`sd2 export` from MLflow (run id and registry alias) and the HF assisted-generation one-liner."""


import torch
from typer.testing import CliRunner

from sd2.cli import app
from sd2.models import save_model
from tests.conftest import make_llama


def test_export_and_hf_one_liner(tmp_path, tok300, monkeypatch):
    monkeypatch.setenv("SD2_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from sd2 import tracking

    target = tmp_path / "target"
    t = make_llama(len(tok300), layers=2, seed=1, eos=tok300.eos_token_id, hidden=64)
    save_model(t, tok300, target)
    drafter = tmp_path / "drafter"
    save_model(make_llama(len(tok300), layers=1, seed=2, eos=tok300.eos_token_id, hidden=64), tok300, drafter)
    res = {"mal": 1.5, "mal_ci95": [1.2, 1.8], "acceptance_rate": 0.2, "per_position_acceptance": [0.3, 0.1],
           "drafter_macs_per_token": 1e5, "cost_ratio": 0.5, "theoretical_speedup": 0.75, "speedup": 0.7,
           "target_tokens_per_s": 100.0, "spec_tokens_per_s": 70.0, "lossless": True, "per_category": {}}
    parent = tracking.start_parent(str(target), "p")
    rid = tracking.log_drafter_run(parent, str(target), "d1", {"kind": "dense"}, res, model_dir=drafter)
    champ = tracking.register_champion(str(target), [rid])
    assert champ["run_id"] == rid

    r = CliRunner().invoke(app, ["export", "--run", f"models:/{champ['name']}@champion", "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    readme = (tmp_path / "e" / "README.md").read_text()
    assert "theoretical_speedup" in readme and "kind" in readme
    r = CliRunner().invoke(app, ["export", "--run", rid, "--out", str(tmp_path / "e2")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["export", "--run", "models:/nope@champion", "--out", str(tmp_path / "e3")])
    assert r.exit_code == 2 and not (tmp_path / "e3").exists()

    # the HF one-liner of docs/deploy.md
    from transformers import AutoModelForCausalLM

    tgt = AutoModelForCausalLM.from_pretrained(target)
    dft = AutoModelForCausalLM.from_pretrained(tmp_path / "e")
    ids = torch.tensor([tok300("the quick fox")["input_ids"]])
    out = tgt.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=dft, max_new_tokens=12,
                       do_sample=False)
    ref = tgt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    assert out.tolist() == ref.tolist()
