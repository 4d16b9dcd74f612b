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
    load: ModelLoadOptions = ModelLoadOptions()

    @field_validator("categories", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [c.strip() for c in v.split(",") if c.strip()]
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
