"""Pydantic configs shared by the CLI, the Prefect flows and prefect.yaml parameters."""

from __future__ import annotations

from pathlib import Path

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
    load: ModelLoadOptions = ModelLoadOptions()

    @field_validator("categories", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            v = [c.strip() for c in v.split(",") if c.strip()]
        return v or None
