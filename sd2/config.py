"""Pydantic configs shared by the CLI, the Prefect flows and prefect.yaml parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sd2.errors import UserError, pydantic_message


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def build(cls, **values):
        """Validate, turning schema errors into one-line UserErrors."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise UserError(pydantic_message(exc)) from None


class ModelLoadOptions(_Base):
    """How model files may be loaded: safetensors only and no remote code unless the user opts in."""

    allow_pickle: bool = False
    trust_remote_code: bool = False


class DecodeConfig(_Base):
    """Decoding parameters of one speculative-decoding evaluation."""

    gamma: int = Field(4, ge=1, description="draft tokens proposed per target verification pass")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    seed: int = 0


class EvalConfig(DecodeConfig):
    """`sd2 eval`: one target, one drafter, a set of prompts."""

    target: str = "smollm2-135m-instruct"
    drafter: str
    prompts: Path | None = Field(None, description="JSONL prompts file; default: Spec-Bench from the data dir")
    categories: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    uag: bool = Field(False, description="allow a drafter with another tokenizer (Universal Assisted Generation)")
    context: int = Field(256, ge=0, description="context length at which attention MACs are counted")
    fast_path: Literal["none", "drafter-fp16", "fp16"] = Field(
        "none", description="CPU numeric path: fp16-packed GEMMs for the drafter, or for both models")
    replay_gammas: list[int] | None = Field(
        None, description="also report greedy MAL at these γ by exact replay (same tokenizer, temperature 0)")
    replay_limit: int | None = Field(None, ge=1, description="prompts for the replay (default: the evaluated ones)")
    load: ModelLoadOptions = ModelLoadOptions()

    @field_validator("categories", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [c.strip() for c in v.split(",") if c.strip()]
        return v or None

    @field_validator("replay_gammas", mode="before")
    @classmethod
    def _split_ints(cls, v):
        if isinstance(v, str):
            v = [int(x) for x in v.split(",") if x.strip()]
        if v and any(int(g) < 1 for g in v):
            raise ValueError("every γ must be >= 1")
        return v or None


class DistillConfig(_Base):
    """`sd2 distill`: the target answers (or rewrites, guided by the reference) each seed prompt."""

    target: str = "smollm2-135m-instruct"
    prompts: str = Field(..., description="JSONL seed file or HF dataset id")
    out: Path
    mode: Literal["regenerate", "rewrite", "reference"] = Field(
        "regenerate", description="regenerate: the target answers; rewrite: the target rewrites the seed answer; "
        "reference: keep the seed answers (the plain-SFT baseline, no generation)")
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(64, ge=1, description="prompts per resumable shard")
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    overwrite: bool = False
    backend: Literal["hf", "openai"] = Field("hf", description="hf: in-process generate; openai: any "
                                             "OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve)")
    base_urls: list[str] = Field(default_factory=list, description="server URLs (several = data-parallel servers)")
    api_key_env: str | None = Field(None, description="name of the env var holding the API key (never logged)")
    concurrency: int = Field(8, ge=1, description="concurrent requests (openai backend)")
    api: Literal["chat", "completions"] = "chat"
    served_model: str | None = Field(None, description="model name on the server (default: --target)")
    request_timeout: float = Field(300.0, gt=0)
    max_retries: int = Field(4, ge=0)
    load: ModelLoadOptions = ModelLoadOptions()


class TrainConfig(_Base):
    """`sd2 train`: fine-tune a drafter on a distilled dataset; sparsity masks of the init model are kept."""

    init: str
    data: Path
    out: Path
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    seq_len: int = Field(512, ge=8)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    packing: bool = False
    loss: Literal["sft", "kd"] = "sft"
    kd_target: str | None = Field(None, description="teacher for --loss kd (default: the data's target)")
    kd_divergence: Literal["fkl", "tv"] = "fkl"
    save_steps: int = Field(100, ge=1)
    resume: bool = False
    deepspeed: Path | None = None
    num_gpus: int = Field(1, ge=1, description="processes to launch; >1 runs torchrun/deepspeed as a subprocess")
    cpu_fallback: bool = Field(False, description="if fewer GPUs exist than asked, train on CPU ranks instead")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    overwrite: bool = False
    load: ModelLoadOptions = ModelLoadOptions()


class SweepGrid(_Base):
    """Grid of one-shot pruning cells: method × pattern × sparsity (N:M patterns imply their sparsity)."""

    methods: list[Literal["sparsegpt", "wanda", "magnitude"]] = ["sparsegpt"]
    patterns: list[str] = ["unstructured"]
    sparsities: list[float] = [0.5]

    def cells(self) -> list[dict]:
        out, seen = [], set()
        for m in self.methods:
            for p in self.patterns:
                for s in (self.sparsities if p == "unstructured" else [None]):
                    if s is None:
                        try:
                            n, mm = (int(x) for x in p.split(":"))
                            s = round(1 - n / mm, 4)
                        except ValueError:
                            s = float("nan")
                    key = (m, p, s)
                    if key not in seen:
                        seen.add(key)
                        out.append({"method": m, "pattern": p, "sparsity": s})
        return out


PROFILES: dict[str, dict] = {
    # tiny: seconds, for tests on tiny models; quick: the `sd2 demo` default (≈10 min on 2 CPU cores);
    # full: a longer, better run.
    "tiny": dict(distill_limit=8, distill_max_new_tokens=8, train_steps=4, sparse_ft_steps=2, train_batch_size=4,
                 seq_len=64, calib_samples=4, eval_limit=2, eval_max_new_tokens=8, distill_batch_size=4),
    "quick": dict(distill_limit=48, distill_max_new_tokens=64, train_steps=30, sparse_ft_steps=15,
                  train_batch_size=4, seq_len=192, calib_samples=16, eval_limit=6, eval_max_new_tokens=48,
                  distill_batch_size=8),
    "full": dict(distill_limit=1024, distill_max_new_tokens=256, train_steps=1000, sparse_ft_steps=300,
                 train_batch_size=16, seq_len=512, calib_samples=128, eval_limit=104, eval_max_new_tokens=128,
                 distill_batch_size=8),
}


class PipelineConfig(_Base):
    """The whole SD² loop: self-distill → train a derived drafter → prune sweep (+ sparse FT) → baselines →
    evaluate every drafter → MLflow + Prefect artifacts. Explicit fields override the profile's values."""

    name: str = "sd2-pipeline"
    profile: Literal["tiny", "quick", "full"] = "quick"
    target: str = "smollm2-135m-instruct"
    seed_prompts: str | None = Field(None, description="seed JSONL or HF id (default: Dolly subset in the data dir)")
    eval_prompts: str | None = Field(None, description="evaluation JSONL (default: Spec-Bench)")
    distill_mode: Literal["regenerate", "rewrite"] = "regenerate"
    drafter_layers: str = Field("0-8,-1", description="layers of the target kept in the derived drafter")
    drafter_base: str | None = Field(
        None, description="model the drafter is derived from (default: the target); another family's model "
        "(other tokenizer) makes a Universal Assisted Generation study")
    sweep: SweepGrid = SweepGrid()
    sft_baseline: bool = Field(False, description="add a drafter fine-tuned on the seed answers (plain SFT)")
    layer_baseline: bool = Field(True, description="add layer-pruned drafters with MACs matched to sparse cells")
    layer_match: list[float] = Field(
        default_factory=lambda: [0.5], description="sparsities of the first method's unstructured cells that "
        "layer-pruned drafters are matched to (in MACs); the first cell when none is in the sweep")
    layer_baseline_from: Literal["dense", "derived"] = Field(
        "dense", description="dense: drop layers of the self-distilled drafter, then fine-tune as long as a "
        "sparse cell (same budget); derived: drop layers of the drafter base, then train as long as the dense one")
    gamma: int = Field(4, ge=1)
    eval_gammas: list[int] = Field(default_factory=list, description="more γ values to evaluate greedily")
    eval_gamma_mode: Literal["replay", "engine"] = Field(
        "replay", description="replay: exact greedy replay (one drafter pass per prompt; same tokenizer only); "
        "engine: a full speculative run per γ (always used for cross-tokenizer drafters)")
    replay_limit: int | None = Field(None, ge=1, description="prompts for replayed γ (default: eval_limit)")
    sampling_temperature: float | None = Field(None, gt=0, description="also one sampling run at this temperature")
    sampling_drafters: list[str] = Field(default_factory=list,
                                         description="drafters (by name) of the sampling run; empty = all")
    threads: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    register_champion: bool = True
    cell_deployment: str | None = Field(
        None, description="run sweep cells as runs of this deployment (e.g. 'sweep-cell/sweep-cell') so several "
        "workers share a sweep; default: in-process tasks")
    distill_limit: int | None = Field(None, ge=1)
    distill_max_new_tokens: int | None = Field(None, ge=1)
    distill_batch_size: int | None = Field(None, ge=1)
    train_steps: int | None = Field(None, ge=1)
    sparse_ft_steps: int | None = Field(None, ge=0)
    train_batch_size: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    calib_samples: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    eval_max_new_tokens: int | None = Field(None, ge=1)

    def resolved(self) -> "PipelineConfig":
        """Fill every None with the profile's value."""
        vals = self.model_dump()
        for k, v in PROFILES[self.profile].items():
            if vals.get(k) is None:
                vals[k] = v
        return PipelineConfig(**vals)
