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
                           threads=threads, uag=uag, context=context,
                           load=ModelLoadOptions(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a .json file path")
    res, df = run_eval(cfg)
    write_json(res, out)
    if records:
        df.to_csv(out.with_suffix(".records.csv"), index=False)
    typer.echo(eval_table(res))
    typer.echo(f"wrote {out}")


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


@app.command("layer-prune")
@_cli
def layer_prune_cmd(
    model: str = typer.Option(..., help="model SPEC"),
    out: Path = typer.Option(..., help="output model dir"),
    keep_layers: str = typer.Option(..., help="layers to keep, e.g. '0-9,29'"),
    overwrite: bool = typer.Option(False),
):
    """Drop decoder layers, keeping an explicit list."""
    from sd2.models import check_output_dir, load_model, save_model
    from sd2.prune.layers import keep_layers as do_keep
    from sd2.prune.layers import parse_layer_list

    check_output_dir(out, overwrite)
    m, tok = load_model(model)
    keep = parse_layer_list(keep_layers, m.config.num_hidden_layers)
    pruned = do_keep(m, keep)
    meta = json.dumps({"source": model, "kept_layers": keep}, indent=2)
    save_model(pruned, tok, out, overwrite=overwrite, extra_files={"sd2_layers.json": meta})
    typer.echo(f"kept {len(keep)} of {m.config.num_hidden_layers} layers → {out}")


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
