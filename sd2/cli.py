"""The `sd2` command. Bad input → one line on stderr and exit code 2; nothing written."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from sd2.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-distilled sparse drafters for speculative decoding.")


def _cli(fn):
    """Run a command body, turning UserError into one line + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.basicConfig(level=logging.INFO, format="[sd2] %(message)s", stream=sys.stderr)
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()
            return fn(*args, **kwargs)
        except UserError as exc:
            typer.echo(f"sd2: error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("eval")
@_cli
def eval_cmd(
    drafter: str = typer.Option(..., help="drafter model SPEC (alias, HF dir or hub id)"),
    out: Path = typer.Option(..., help="where to write the JSON result"),
    target: str = typer.Option("smollm2-135m-instruct", help="target model SPEC"),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts (default: Spec-Bench in the data dir)"),
    categories: Optional[str] = typer.Option(None, help="comma-separated categories"),
    limit: Optional[int] = typer.Option(None, help="number of prompts, taken in turn from each category"),
    gamma: int = typer.Option(4, help="draft tokens per verification"),
    max_new_tokens: int = typer.Option(128),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch threads (pin for comparable timings)"),
    uag: bool = typer.Option(False, help="allow a drafter with another tokenizer"),
    context: int = typer.Option(256, help="context length for attention MACs"),
    fast_path: str = typer.Option("none", help="CPU numeric path: none | drafter-fp16 | fp16 (both models)"),
    allow_pickle: bool = typer.Option(False, help="allow loading pickle (.bin) weights"),
    trust_remote_code: bool = typer.Option(False),
    records: bool = typer.Option(True, help="also write per-prompt records beside --out (.records.csv)"),
):
    """Speculative decoding of every prompt with the drafter, and target-only decoding, in one process."""
    from sd2.config import EvalConfig, ModelLoadOptions
    from sd2.evaluate import run_eval, write_json
    from sd2.report import eval_table

    cfg = EvalConfig.build(target=target, drafter=drafter, prompts=prompts, categories=categories, limit=limit,
                           gamma=gamma, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                           threads=threads, uag=uag, context=context, fast_path=fast_path,
                           load=ModelLoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a .json file path")
    res, df = run_eval(cfg)
    write_json(res, out)
    if records:
        df.to_csv(out.with_suffix(".records.csv"), index=False)
    typer.echo(eval_table(res))
    typer.echo(f"wrote {out}")


@app.command("distill")
@_cli
def distill_cmd(
    prompts: str = typer.Option(..., help="seed JSONL file or HF dataset id"),
    out: Path = typer.Option(..., help="output dataset dir (datasets.load_from_disk)"),
    target: str = typer.Option("smollm2-135m-instruct", help="target model SPEC"),
    mode: str = typer.Option("regenerate", help="regenerate | rewrite | reference (seed answers, no generation)"),
    limit: Optional[int] = typer.Option(None, help="number of seed records"),
    max_new_tokens: int = typer.Option(256),
    batch_size: int = typer.Option(8),
    shard_size: int = typer.Option(64, help="prompts per resumable shard"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
    allow_pickle: bool = typer.Option(False),
    trust_remote_code: bool = typer.Option(False),
):
    """Self-data distillation: the target answers the seed prompts itself. Re-run the same command to resume."""
    from sd2.config import DistillConfig, ModelLoadOptions
    from sd2.distill import distill

    cfg = DistillConfig.build(target=target, prompts=prompts, out=out, mode=mode, limit=limit,
                              max_new_tokens=max_new_tokens, batch_size=batch_size, shard_size=shard_size,
                              temperature=temperature, seed=seed, threads=threads, overwrite=overwrite,
                              load=ModelLoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    path = distill(cfg)
    manifest = json.loads((path / "sd2_manifest.json").read_text())
    typer.echo(f"wrote {path}: {json.dumps(manifest['counts'])}")


@app.command("train")
@_cli
def train_cmd(
    init: str = typer.Option(..., help="drafter to start from (model SPEC); its zeros are kept"),
    data: Path = typer.Option(..., help="dataset dir from `sd2 distill`"),
    out: Path = typer.Option(..., help="output model dir"),
    max_steps: int = typer.Option(200),
    lr: float = typer.Option(1e-4),
    batch_size: int = typer.Option(8),
    grad_accum: int = typer.Option(1),
    seq_len: int = typer.Option(512),
    warmup_ratio: float = typer.Option(0.05),
    weight_decay: float = typer.Option(0.0),
    packing: bool = typer.Option(False, help="pack examples into seq-len blocks"),
    loss: str = typer.Option("sft", help="sft | kd (distill the target's logits)"),
    kd_target: Optional[str] = typer.Option(None, help="teacher for --loss kd (default: the data's target)"),
    kd_divergence: str = typer.Option("fkl", help="fkl | tv"),
    save_steps: int = typer.Option(100, help="checkpoint every N steps"),
    resume: bool = typer.Option(False, help="continue from the last checkpoint of an unfinished run"),
    deepspeed: Optional[Path] = typer.Option(None, help="DeepSpeed config, e.g. infra/deepspeed/zero2.json"),
    num_gpus: int = typer.Option(1, help="ranks to launch (>1: torchrun subprocess)"),
    cpu_fallback: bool = typer.Option(False, help="with fewer GPUs than --num-gpus, use CPU ranks (gloo)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
):
    """Fine-tune a drafter on distilled data (DeepSpeed ZeRO when configured); sparsity masks are kept exactly."""
    from sd2.config import TrainConfig
    from sd2.train import train

    cfg = TrainConfig.build(init=init, data=data, out=out, max_steps=max_steps, lr=lr, batch_size=batch_size,
                            grad_accum=grad_accum, seq_len=seq_len, warmup_ratio=warmup_ratio,
                            weight_decay=weight_decay, packing=packing, loss=loss, kd_target=kd_target,
                            kd_divergence=kd_divergence, save_steps=save_steps, resume=resume, deepspeed=deepspeed,
                            num_gpus=num_gpus, cpu_fallback=cpu_fallback, seed=seed, threads=threads,
                            overwrite=overwrite)
    path = train(cfg)
    info = json.loads((path / "sd2_train.json").read_text())
    typer.echo(f"wrote {path}: {info['global_step']} steps, train loss {info['train_loss']:.4f}, "
               f"{info['train_tokens_per_s'] or 0:.0f} tokens/s")


@app.command("macs")
@_cli
def macs_cmd(
    model: str = typer.Option(..., help="model SPEC"),
    context: int = typer.Option(256, help="context length for attention MACs"),
    out: Optional[Path] = typer.Option(None, help="also write the JSON here"),
):
    """MACs per token, counting only nonzero linear weights."""
    from sd2.evaluate import write_json
    from sd2.metrics import macs_per_token
    from sd2.models import load_model

    if context < 0:
        raise UserError("--context: must be >= 0")
    m, _ = load_model(model, with_tokenizer=False)
    res = {"model": model, **macs_per_token(m, context)}
    if out:
        write_json(res, out)
    typer.echo(json.dumps(res, indent=2))


@app.command("prune")
@_cli
def prune_cmd(
    model: str = typer.Option(..., help="model SPEC to prune"),
    method: str = typer.Option(..., help="sparsegpt | wanda | magnitude"),
    out: Path = typer.Option(..., help="output model dir (+ sparsity.json)"),
    sparsity: Optional[float] = typer.Option(None, help="share of weights to zero, in [0, 1) (implied by N:M)"),
    pattern: str = typer.Option("unstructured", help="unstructured | N:M such as 2:4"),
    calib: Optional[Path] = typer.Option(None, help="distilled dataset dir or prompts JSONL (sparsegpt, wanda)"),
    calib_samples: int = typer.Option(32, help="calibration samples"),
    seq_len: int = typer.Option(256, help="tokens per calibration sample"),
    layer_filter: str = typer.Option(r"(self_attn|mlp)\.\w+_proj$", "--filter", help="regex on decoder linear names"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None),
    overwrite: bool = typer.Option(False),
):
    """One-shot pruning of the decoder's linear layers; writes zeros in place (plain safetensors)."""
    from sd2.evaluate import torch_threads
    from sd2.models import check_output_dir, load_model, save_model
    from sd2.prune import prune_model, validate
    from sd2.prune.calib import calibration_ids
    from sd2.prune.masks import check_sparsity, parse_pattern, sparsity_report

    nm = parse_pattern(pattern)
    if sparsity is None:
        if nm is None:
            raise UserError("--sparsity: required for unstructured pruning")
        sparsity = 1 - nm[0] / nm[1]
    check_sparsity(sparsity)
    if calib_samples < 1:
        raise UserError("--calib-samples: must be >= 1")
    check_output_dir(out, overwrite)
    m, tok = load_model(model)
    validate(m, method, sparsity, pattern, layer_filter)
    samples = calibration_ids(calib, tok, calib_samples, seq_len, seed) if method != "magnitude" else None
    with torch_threads(threads):
        info = prune_model(m, method, sparsity, pattern, samples, layer_filter)
    report = sparsity_report(m, layer_filter)
    meta = {"source": model, "method": method, "pattern": pattern, "requested_sparsity": sparsity,
            "calib": str(calib) if calib else None, "calib_samples": calib_samples if samples else 0,
            "seconds": round(info["seconds"], 2), **report}
    save_model(m, tok, out, overwrite=overwrite, extra_files={"sparsity.json": json.dumps(meta, indent=2)})
    typer.echo(f"{method} {pattern} → sparsity {report['sparsity']:.4f} over {len(report['layers'])} layers "
               f"in {info['seconds']:.1f}s → {out}")


@app.command("layer-prune")
@_cli
def layer_prune_cmd(
    model: str = typer.Option(..., help="model SPEC"),
    out: Path = typer.Option(..., help="output model dir"),
    keep_layers: Optional[str] = typer.Option(None, help="layers to keep, e.g. '0-9,29'"),
    num_layers: Optional[int] = typer.Option(None, help="layers the pruned model keeps"),
    strategy: str = typer.Option("angular", help="angular (drop the most redundant block) | first"),
    match_macs: Optional[str] = typer.Option(None, help="pick --num-layers so MACs/token match this model"),
    calib: Optional[Path] = typer.Option(None, help="distilled dataset dir or prompts JSONL (angular)"),
    calib_samples: int = typer.Option(16),
    seq_len: int = typer.Option(256),
    context: int = typer.Option(256, help="context length for --match-macs MACs"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
):
    """Drop decoder layers: an explicit list, or K layers chosen by strategy (optionally K matched on MACs)."""
    from sd2.metrics import macs_per_token
    from sd2.models import check_output_dir, load_model, save_model
    from sd2.prune.calib import calibration_ids
    from sd2.prune.layers import choose_layers, keep_layers as do_keep, layers_for_macs, parse_layer_list

    given = [x is not None for x in (keep_layers, num_layers, match_macs)]
    if sum(given) != 1:
        raise UserError("give exactly one of --keep-layers, --num-layers, --match-macs")
    check_output_dir(out, overwrite)
    m, tok = load_model(model)
    info: dict = {"source": model}
    if keep_layers is not None:
        keep = parse_layer_list(keep_layers, m.config.num_hidden_layers)
    else:
        if match_macs is not None:
            ref, _ = load_model(match_macs, with_tokenizer=False)
            ref_macs = macs_per_token(ref, context)["macs_per_token"]
            num_layers = layers_for_macs(m, ref_macs, context)
            info.update(match_macs=match_macs, reference_macs_per_token=ref_macs)
        samples = calibration_ids(calib, tok, calib_samples, seq_len, seed) if strategy == "angular" else None
        keep = choose_layers(m, num_layers, strategy, samples)
        info["strategy"] = strategy
    pruned = do_keep(m, keep)
    info.update(kept_layers=keep, macs_per_token=macs_per_token(pruned, context)["macs_per_token"])
    save_model(pruned, tok, out, overwrite=overwrite, extra_files={"sd2_layers.json": json.dumps(info, indent=2)})
    typer.echo(f"kept {len(keep)} of {m.config.num_hidden_layers} layers {keep} → {out}")


@app.command("demo")
@_cli
def demo_cmd(
    limit: int = typer.Option(6, help="Spec-Bench prompts (one per category in turn)"),
    max_new_tokens: int = typer.Option(48),
    gamma: int = typer.Option(4),
    threads: int = typer.Option(1, help="torch threads"),
    out: Path = typer.Option(Path("sd2-runs/demo-eval.json")),
):
    """Quick demo: derive a drafter from SmolLM2 (layers 0-9 + 29) and evaluate it on Spec-Bench prompts."""
    from sd2.config import EvalConfig
    from sd2.evaluate import run_eval, write_json
    from sd2.models import load_model, save_model, sd2_home
    from sd2.prune.layers import keep_layers
    from sd2.report import eval_table

    target = "smollm2-135m-instruct"
    drafter_dir = sd2_home() / "drafters" / f"{target}-L0-9_29"
    if not (drafter_dir / "config.json").exists():
        m, tok = load_model(target)
        save_model(keep_layers(m, list(range(10)) + [29]), tok, drafter_dir, overwrite=True)
    cfg = EvalConfig.build(target=target, drafter=str(drafter_dir), limit=limit, max_new_tokens=max_new_tokens,
                           gamma=gamma, threads=threads)
    res, _ = run_eval(cfg)
    write_json(res, out)
    typer.echo(eval_table(res))
    typer.echo(f"wrote {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
