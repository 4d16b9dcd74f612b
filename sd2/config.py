"""Pydantic configs shared by the CLI, the Prefect flows and prefect.yaml parameters."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, get_args

import logging
from typing import ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sd2.errors import PATTERN_HINTS, UserError, pydantic_message

# One vocabulary, defined once: the CLI, the flows, prefect.yaml and the library all use these.
DEFAULT_TARGET = "smollm2-135m-instruct"
LOOKUP_MAX = 4  # the longest context suffix prompt lookup matches (it tries the longest first)
Method = Literal["sparsegpt", "wanda", "magnitude"]
METHODS: tuple[str, ...] = get_args(Method)
FastPath = Literal["auto", "none", "lean", "lean-fp16", "drafter-fp16", "fp16", "fp16-lean-drafter"]
FAST_PATHS: tuple[str, ...] = get_args(FastPath)
FP16_TARGET_PATHS = ("lean-fp16", "fp16", "fp16-lean-drafter")  # the numeric paths whose target runs fp16 weights
_DEVICE_RE = r"^(auto|cpu|cuda(:\d+)?)$"
_PATTERN_RE = r"^(unstructured|[1-9]\d*:[1-9]\d*)$"
_LAYERS_RE = r"^\s*-?\d+(\s*-\s*-?\d+)?(\s*,\s*-?\d+(\s*-\s*-?\d+)?)*\s*$"
PATTERN_HINTS.update({_DEVICE_RE: "auto, cpu, cuda or cuda:N", _PATTERN_RE: "unstructured or N:M such as 2:4",
                      _LAYERS_RE: "a list of layers and ranges such as '0-8,-1' (negative = from the end)"})
Device = Annotated[str, Field(pattern=_DEVICE_RE,
                              description="auto (first GPU when one exists, else CPU) | cpu | cuda | cuda:N")]
DType = Literal["auto", "bfloat16", "float16", "float32"]
# training precision of a pipeline or sweep form: also `fast` (bf16 where this machine runs it natively, else fp32)
TrainDType = Literal["auto", "bfloat16", "float16", "float32", "fast"]


def _check_pattern(p: str) -> str:
    from sd2.prune.masks import parse_pattern  # light module; raises a ValueError naming the fix

    parse_pattern(p)
    return p


def _check_layers(spec: str) -> str:
    parts = [q.strip() for q in spec.split(",") if q.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+(\s*-\s*-?\d+)?", q) for q in parts):
        raise ValueError("use a list of layer indices and ranges such as '0-8,-1' (negative = from the end)")
    return spec


# Constrained scalar types: the constraints travel into the JSON schema, so the Prefect UI form shows and
# enforces them too.
Sparsity = Annotated[float, Field(ge=0.0, lt=1.0, description="share of weights set to zero, in [0, 1)")]
Pattern = Annotated[str, Field(pattern=_PATTERN_RE,
                               description="unstructured, or N:M with 0 < N < M such as 2:4"),
                    AfterValidator(_check_pattern)]
Allocation = Annotated[Literal["uniform", "owl"], Field(
    description="how the sparsity is spread over layers: uniform, or owl (layers richer in activation outliers "
    "keep more weights; the mean, hence the MACs, is unchanged)")]
OwlLambda = Annotated[float, Field(ge=0.0, lt=0.5, description="owl: layer sparsities span sparsity ± lambda")]
OwlM = Annotated[float, Field(gt=0.0, description="owl: a Wanda score is an outlier above M × its layer's mean")]
Gamma = Annotated[int, Field(ge=1, le=64, description="draft tokens per verification")]
LayerList = Annotated[str, Field(pattern=_LAYERS_RE,
                                 description="layers kept, e.g. '0-8,-1' (negative = from the end)"),
                      AfterValidator(_check_layers)]


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields renamed so that one name runs from YAML to the Prefect form to the CLI: the old names are still
    # read (with a deprecation line) for one release.
    renamed: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, values):
        if isinstance(values, dict) and cls.renamed:
            for old, new in cls.renamed.items():
                if old in values and new not in values:
                    logging.getLogger("sd2").warning("%s: field %r is deprecated; call it %r", cls.__name__, old, new)
                    values = {**{k: v for k, v in values.items() if k != old}, new: values[old]}
        return values

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


class DevicePlacement(_Base):
    """Where a stage runs and in which dtype (see sd2.device.resolve_device)."""

    device: Device = "auto"
    dtype: DType = Field("auto", description="auto: bfloat16 on a GPU, float32 on the CPU")


def resolve_train_dtype(requested: str | None, dtype: str, device: str) -> str:
    """A form's training precision as the trainer takes it (`fast` resolved on this machine)."""
    from sd2.device import train_dtype

    return train_dtype(requested, dtype, device)


class DecodeConfig(_Base):
    """Decoding parameters of one speculative-decoding evaluation."""

    gamma: Gamma = 4
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    seed: int = 0


class EvalOptions(DecodeConfig, DevicePlacement):
    """How one drafter is evaluated (everything of `sd2 eval` but the models and the prompts file)."""

    categories: list[str] | None = None
    limit: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    uag: bool = Field(False, description="allow a drafter with another tokenizer (Universal Assisted Generation)")
    context: int = Field(256, ge=0, description="context length at which attention MACs are counted")
    fast_path: FastPath = Field(
        "auto", description="numeric path: auto (CPU: lean engine with fp16 weights where the models allow it; "
        "GPU: none) | none (HF modules, exact in the dtype) | lean (fused weights, preallocated KV cache) | "
        "lean-fp16 (each layer one call into sd2's C kernel) | drafter-fp16 | fp16 (HF modules, fp16-weight GEMMs) | "
        "fp16-lean-drafter (a target the lean engine cannot run on fp16 HF modules, a Llama drafter on lean-fp16)")
    replay_gammas: list[Gamma] | None = Field(
        None, description="also report greedy MAL at these γ by exact replay (same tokenizer, temperature 0)")
    replay_limit: int | None = Field(None, ge=1, description="prompts for the replay (default: the evaluated ones)")
    draft_threshold: float | None = Field(
        None, gt=0, lt=1, description="dynamic draft length: stop drafting when the drafter's top-1 probability is "
        "below this (γ is then the maximum); lossless either way")
    lookup: int = Field(0, ge=0, le=LOOKUP_MAX, description="prompt lookup in front of the drafter: when the "
                        "context's last n ≥ this many tokens occurred before, draft what followed them there (free, "
                        "lossless); 0 = off")
    shared_kv: Literal["auto", "on", "off"] = Field(
        "auto", description="the drafter reads the target's KV cache (sd2.sharedkv; a pruned copy of the target): "
        "auto = when it was trained so (its config says), on/off to compare")
    prompt_vocab: bool = Field(
        False, description="a compact draft head also scores each prompt's own tokens (rows of the target's head for "
        "the prompt's tokens outside the draft vocabulary; their MACs count in c): lossless; no effect on a full head")
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


class EvalConfig(EvalOptions):
    """`sd2 eval`: one target, one drafter, a set of prompts."""

    target: str = DEFAULT_TARGET
    drafter: str
    prompts: Path | None = Field(None, description="JSONL prompts file; default: Spec-Bench from the data dir")


class DistillSettings(DevicePlacement):
    """How self-distillation runs (everything of `sd2 distill` but the target, the seeds and the output)."""

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
    backend: Literal["hf", "openai"] = Field("hf", description="hf: in-process generate; openai: any "
                                             "OpenAI-compatible server (vLLM, SGLang, TGI, transformers serve)")
    base_urls: list[str] = Field(default_factory=list, description="server URLs (several = data-parallel servers)")
    api_key_env: str | None = Field(None, description="name of the env var holding the API key (never logged)")
    concurrency: int = Field(8, ge=1, description="concurrent requests (openai backend)")
    api: Literal["chat", "completions"] = "chat"
    served_model: str | None = Field(None, description="model name on the server (default: --target)")
    request_timeout: float = Field(300.0, gt=0)
    max_retries: int = Field(4, ge=0)
    fast_path: Literal["none", "fp16"] = Field(
        "none", description="CPU numeric path of in-process generation: fp16 = fp16 weights in sd2's CPU kernel "
        "(faster; the weights of `sd2 eval`'s default lean-fp16 path)")
    max_prompt_tokens: int | None = Field(None, ge=8, description="skip seeds whose chat-templated prompt is longer "
                                          "(prefill costs as much as generation on a CPU; counted as too_long_skipped)")
    magpie_openers: Literal["none", "tasks"] = Field(
        "none", description="self-written (magpie) seeds: none = the target writes whole requests; tasks = most "
        "start from one of sd2's task openers (code, translation, summary, extraction, roleplay, …), which the target "
        "completes — requests of kinds it rarely writes unprompted")
    store_topk: int = Field(0, ge=0, le=1024, description="keep the target's top-k logits at every generated token "
                            "(KD without rerunning the target; 0 = off; hf backend)")
    workers: int = Field(1, ge=1, description="in-process generation workers over disjoint shards (hf backend); "
                         "on a GPU node one per visible GPU; the merged dataset equals one worker's")
    load: ModelLoadOptions = ModelLoadOptions()


class DistillConfig(DistillSettings):
    """`sd2 distill`: the target answers (or rewrites, guided by the reference) each seed prompt."""

    target: str = DEFAULT_TARGET
    prompts: str = Field(..., description="JSONL seed file or HF dataset id")
    out: Path
    overwrite: bool = False


class TrainSettings(DevicePlacement):
    """How a drafter is fine-tuned (everything of `sd2 train` but the init model, the data and the output)."""

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
    kd_teacher: Literal["auto", "stored", "live"] = Field(
        "auto", description="KD teacher: stored = the top-k logits `sd2 distill --store-topk` kept (no teacher pass); "
        "live = run the teacher every step; auto = stored when the data has them")
    draft_vocab: int = Field(0, ge=0, description="compact drafter head over the K most frequent tokens of the data "
                             "(0 = full head); the map is saved beside the weights")
    layer_kd: float = Field(0.0, ge=0, description="weight of a per-layer hidden-state loss (SquareHead, Kurtic et "
                            "al. 2023): each decoder layer's output matched to the teacher's, normalised by the "
                            "teacher's; for a drafter as deep and wide as the target (a sparse copy); 0 = off")
    freeze_embeddings: bool = Field(False, description="keep the input embeddings fixed (the target's own)")
    shared_kv: bool = Field(False, description="train the drafter to read the target's KV cache (sd2.sharedkv: a "
                            "pruned copy of the target attends to the target's keys and values of the context, and "
                            "drafts that way in sd2's engine)")
    shared_kv_rounds: int = Field(1, ge=1, le=16, description="shared_kv: train in draft rounds of this many "
                                  "positions (each at the draft step it has in the engine: the target's keys before "
                                  "the round, its own within it; set to γ); 1 = every position the round's first")
    feature_drafter: bool = Field(False, description="train a feature drafter (EAGLE-style: one layer reading the "
                                  "target's hidden states; --init is then the target)")
    feature_layer: int = Field(-1, description="feature drafter: the target layer its layers are copied from")
    feature_layers: int = Field(1, ge=1, description="feature drafter: decoder layers (EAGLE uses one)")
    feature_reads: list[int] = Field(default_factory=lambda: [-1], min_length=1, description="feature drafter: "
                                     "target layers it reads (-1 = the final normed state; several = EAGLE-3's "
                                     "low/mid/high features, e.g. [4, 15, -1])")

    @field_validator("feature_reads", mode="before")
    @classmethod
    def _reads(cls, v):
        if isinstance(v, str):
            try:
                v = [int(x) for x in v.split(",") if x.strip()]
            except ValueError:
                raise ValueError("layer indices separated by commas, e.g. '4,15,-1'") from None
        return v
    feature_weight: float = Field(1.0, ge=0, description="feature drafter: weight of the feature-regression loss")
    feature_noise: float = Field(0.0, ge=0, description="feature drafter: Gaussian noise (std) on the input "
                                 "features while training, so drafts made from its own features hold up")
    feature_unroll: bool = Field(False, description="feature drafter: also train the second draft step on the "
                                 "drafter's own feature (training-time test, EAGLE-3)")
    feature_freeze: bool = Field(False, description="feature drafter: keep its embeddings and head fixed (the "
                                 "target's own, as EAGLE does): only its layer and feature mixer train")
    feature_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="feature drafter: precision of the target's feature pass (auto: bf16 on GPUs and on "
        "CPUs with AVX-512 BF16, else fp32)")
    save_steps: int = Field(100, ge=1)
    deepspeed: Path | None = None
    num_gpus: int = Field(1, ge=1, description="processes to launch; >1 runs torchrun/deepspeed as a subprocess")
    cpu_fallback: bool = Field(False, description="if fewer GPUs exist than asked, train on CPU ranks instead")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    load: ModelLoadOptions = ModelLoadOptions()


class TrainConfig(TrainSettings):
    """`sd2 train`: fine-tune a drafter on a distilled dataset; sparsity masks of the init model are kept."""

    init: str
    data: Path
    out: Path
    resume: bool = False
    overwrite: bool = False
    extra_data: list[Path] = Field(default_factory=list, description="more dataset dirs trained on with --data "
                                   "(e.g. seed answers from `sd2 distill --mode reference` for a feature drafter)")
    curve_dir: Path | None = Field(None, description="also write the drafter at every save step here (step-N/), "
                                   "for learning curves")


class PruneSettings(DevicePlacement):
    """One-shot pruning of a model's decoder linears (`sd2 prune` but the model, calibration data and output)."""

    method: Method
    pattern: Pattern = "unstructured"
    sparsity: Sparsity | None = Field(None, description="implied by an N:M pattern")
    calib_samples: int = Field(32, ge=1)
    seq_len: int = Field(256, ge=8)
    layer_filter: str = r"(self_attn|mlp)\.\w+_proj$"
    allocation: Allocation = "uniform"
    owl_lambda: OwlLambda = 0.08
    owl_m: OwlM = 5.0
    seed: int = 0
    threads: int | None = Field(None, ge=1)


class LayerPruneSettings(DevicePlacement):
    """Dropping decoder layers (`sd2 layer-prune` but the model, the MACs reference, calibration and output)."""

    keep_layers: LayerList | None = None
    num_layers: int | None = Field(None, ge=1)
    strategy: Literal["angular", "first"] = "angular"
    calib_samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)
    context: int = Field(256, ge=0)
    seed: int = 0


class SweepGrid(_Base):
    """Grid of one-shot pruning cells: method × pattern × sparsity (N:M patterns imply their sparsity)."""

    methods: list[Method] = Field(["sparsegpt"], min_length=1)
    patterns: list[Pattern] = Field(["unstructured"], min_length=1)
    sparsities: list[Sparsity] = Field([0.5], min_length=1, description="sparsities of the unstructured cells")
    allocation: Allocation = "uniform"
    owl_lambda: OwlLambda = 0.08
    owl_m: OwlM = 5.0

    def cells(self) -> list[dict]:
        from sd2.prune.masks import parse_pattern

        out, seen = [], set()
        for m in self.methods:
            for p in self.patterns:
                nm = parse_pattern(p)
                for s in (self.sparsities if nm is None else [round(1 - nm[0] / nm[1], 4)]):
                    key = (m, p, s)
                    if key not in seen:  # N:M cells fix every layer's sparsity, magnitude has no activations
                        seen.add(key)
                        alloc = self.allocation if nm is None and m != "magnitude" else "uniform"
                        out.append({"method": m, "pattern": p, "sparsity": s, "allocation": alloc})
        return out


# The plain recipe: SFT on the target's answers, the full head, unpacked examples (the tiny profile, and a drafter
# of another family in every profile).
CROSS_FAMILY = dict(lr=2e-4, train_loss="sft", distill_store_topk=0, draft_vocab=0, packing=False)

PROFILES: dict[str, dict] = {
    # tiny: seconds, for tests on tiny models; quick: the `sd2 demo` default (≤ 15 min on 2 CPU cores);
    # full: a longer, better run. quick and full train with the levers docs/drafter-recipe.md measured: KD from the
    # target's stored top-k logits, a compact draft head, packed sequences (nothing dropped), a higher lr.
    "tiny": dict(distill_limit=8, distill_max_new_tokens=8, train_steps=4, sparse_ft_steps=2, train_batch_size=4,
                 seq_len=64, calib_samples=4, eval_limit=2, eval_max_new_tokens=8, distill_batch_size=4,
                 threads=1, **CROSS_FAMILY),
    "quick": dict(distill_limit=160, distill_max_new_tokens=96, train_steps=48, sparse_ft_steps=16,
                  train_batch_size=8, seq_len=256, calib_samples=16, eval_limit=6, eval_max_new_tokens=48,
                  distill_batch_size=16, distill_max_prompt_tokens=320, threads=2, lr=2e-3, train_loss="kd",
                  distill_store_topk=32, draft_vocab=6144, packing=True),
    "full": dict(distill_limit=1024, distill_max_new_tokens=256, train_steps=1000, sparse_ft_steps=300,
                 train_batch_size=16, seq_len=512, calib_samples=128, eval_limit=104, eval_max_new_tokens=128,
                 distill_batch_size=8, threads=2, lr=2e-3, train_loss="kd", distill_store_topk=32,
                 draft_vocab=6144, packing=True),
}


def _cpu_only() -> bool:
    """No GPU visible, and sd2's kernel runs vectorised here: the pipeline's distillation then runs the CPU's fast
    numeric path (fp16-weight GEMMs)."""
    from sd2.device import visible_gpus
    from sd2.fastpath import vectorized

    return not visible_gpus() and vectorized()


class PipelineConfig(_Base):
    """The whole SD² loop: self-distill → train a derived drafter → prune sweep (+ sparse FT) → baselines →
    evaluate every drafter → MLflow + Prefect artifacts. Explicit fields override the profile's values."""

    name: str = "sd2-pipeline"
    profile: Literal["tiny", "quick", "full"] = "quick"
    target: str = DEFAULT_TARGET
    seed_prompts: str | None = Field(None, description="seed JSONL or HF id (default: Dolly subset in the data dir)")
    eval_prompts: str | None = Field(None, description="evaluation JSONL (default: Spec-Bench)")
    distill_mode: Literal["regenerate", "rewrite"] = "regenerate"
    drafter_layers: LayerList = Field("0-8,-1", description="layers of the target kept in the derived drafter")
    drafter_base: str | None = Field(
        None, description="model the drafter is derived from (default: the target); another family's model "
        "(other tokenizer) makes a Universal Assisted Generation study")
    sweep: SweepGrid = SweepGrid()
    prune: bool = Field(True, description="run the prune sweep (and the layer-pruned baselines matched to it); off: "
                        "a drafter recipe (distill → train → evaluate)")
    untuned_baseline: bool = Field(True, description="also evaluate the derived drafter before training")
    sft_baseline: bool = Field(False, description="add a drafter fine-tuned on the seed answers (plain SFT)")
    layer_baseline: bool = Field(True, description="add layer-pruned drafters with MACs matched to sparse cells")
    layer_match: list[Sparsity] = Field(
        default_factory=lambda: [0.5], description="sparsities of the first method's unstructured cells that "
        "layer-pruned drafters are matched to (in MACs); the first cell when none is in the sweep")
    layer_baseline_from: Literal["dense", "derived"] = Field(
        "dense", description="dense: drop layers of the self-distilled drafter, then fine-tune as long as a "
        "sparse cell (same budget); derived: drop layers of the drafter base, then train as long as the dense one")
    gamma: Gamma = 4
    eval_gammas: list[Gamma] = Field(default_factory=list, description="more γ values to evaluate greedily")
    eval_gamma_mode: Literal["replay", "engine"] = Field(
        "replay", description="replay: exact greedy replay (one drafter pass per prompt; same tokenizer only); "
        "engine: a full speculative run per γ (always used for cross-tokenizer drafters)")
    replay_limit: int | None = Field(None, ge=1, description="prompts for replayed γ (default: eval_limit); set, the "
                                     "headline MAL at γ is replayed over them too, with or without eval_gammas")
    sampling_temperature: float | None = Field(None, gt=0, description="also one sampling run at this temperature")
    sampling_drafters: list[str] = Field(default_factory=list,
                                         description="drafters (by name) of the sampling run; empty = all")
    threads: int | None = Field(None, ge=1, description="torch threads of every stage (default: the profile's)")
    device: Device = "auto"
    dtype: DType = Field("auto", description="auto: bfloat16 on a GPU, float32 on the CPU")
    train_dtype: TrainDType | None = Field(
        None, description="precision of training and sparse fine-tuning alone (default: dtype); fast = bfloat16 mixed "
        "precision where this machine runs bf16 natively (a GPU; a CPU with AVX-512 BF16 or AMX: ≈ 1.7× faster steps "
        "than float32), else float32 (an AVX2-only CPU emulates bf16 ≈ 8× slower than fp32)")
    fast_path: FastPath = Field("auto", description="numeric path of evaluation: auto = the lean engine with "
                                "fp16 weights (sd2's C kernel) on the CPU, the HF modules on a GPU; none = HF modules")
    draft_threshold: float | None = Field(None, gt=0, lt=1, description="dynamic draft length in evaluation: stop "
                                          "drafting below this top-1 drafter probability (γ is the maximum)")
    lookup: int = Field(0, ge=0, le=LOOKUP_MAX, description="prompt lookup in evaluation: copy what followed the "
                        "context's last n ≥ this many tokens where they occurred before, else ask the drafter; 0 = off")
    prompt_vocab: bool = Field(False, description="in evaluation, a compact draft head (draft_vocab) also scores each "
                               "prompt's own tokens: rows of the target's head, counted in c; lossless")
    lr: float | None = Field(None, gt=0, le=1.0, description="learning rate of training and sparse fine-tuning "
                             "(default: the profile's)")
    register_champion: bool = True
    cell_deployment: str | None = Field(
        None, description="run sweep cells as runs of this deployment (e.g. 'sweep-cell/sweep-cell') so several "
        "workers share a sweep; default: in-process tasks")
    distill_store_topk: int | None = Field(None, ge=0, le=1024, description="keep the target's top-k logits per "
                                           "generated token (KD from them: no teacher pass during training; "
                                           "default: the profile's)")
    distill_max_prompt_tokens: int | None = Field(None, ge=8, description="skip seeds with longer prompts")
    magpie_openers: Literal["none", "tasks"] = Field("none", description="self-written seeds: tasks = started from "
                                                     "sd2's task openers (code, translation, summary, …)")
    train_loss: Literal["sft", "kd"] | None = Field(None, description="sft: cross-entropy on the target's answers; "
                                                    "kd: forward KL to the target's logits (stored ones when "
                                                    "distilled with distill_store_topk; default: the profile's)")
    draft_vocab: int | None = Field(None, ge=0, description="compact drafter head over the K most frequent target "
                                    "tokens of the distilled data (0 = the full head; default: the profile's)")
    freeze_embeddings: bool = Field(False, description="keep the drafter's input embeddings fixed")
    layer_kd: float = Field(0.0, ge=0, description="sparse fine-tuning: weight of a per-layer hidden-state loss "
                            "against the target (cells as deep as the target: drafter_layers '0--1'); 0 = off")
    shared_kv: bool = Field(False, description="train (and evaluate) drafters that read the target's KV cache "
                            "(sd2.sharedkv): for copies of the target's every layer (drafter_layers '0--1'), pruned "
                            "by the sweep; the layer-pruned baselines read it too where their layers map onto the "
                            "target's (slices of such a copy), else keep their own cache")
    shared_kv_rounds: int = Field(1, ge=1, le=16, description="shared_kv: positions per training draft round "
                                  "(γ: every draft step trained as the engine runs it; 1: the first only)")
    packing: bool | None = Field(None, description="pack training examples into full seq_len blocks (default: the "
                                 "profile's)")
    feature_drafter: bool = Field(False, description="train an EAGLE-style feature drafter (one layer reading the "
                                  "target's hidden states, built from the target) instead of a drafter cut from "
                                  "drafter_layers; a drafter recipe (prune: false)")
    feature_noise: float = Field(0.0, ge=0, description="feature drafter: noise std on its input features while "
                                 "training")
    feature_reads: list[int] = Field(default_factory=lambda: [-1], min_length=1, description="feature drafter: "
                                     "target layers it reads (-1 = the final normed state; e.g. [3, 15, -1])")
    feature_unroll: bool = Field(False, description="feature drafter: also train its second draft step on its own "
                                 "feature (training-time test)")
    reference_seeds: str | None = Field(None, description="seeds whose own reference answers are added to the "
                                        "training text (e.g. 'dolly-15k-subset.jsonl:1952+gsm8k_train.jsonl:2500'); "
                                        "cheap data for a feature drafter, whose teacher is the target's logits on "
                                        "any text")
    distill_limit: int | None = Field(None, ge=1)
    distill_max_new_tokens: int | None = Field(None, ge=1)
    distill_batch_size: int | None = Field(None, ge=1)
    train_steps: int | None = Field(None, ge=0, description="steps of the drafter's dense training; 0: none, the "
                                    "sweep prunes the derived drafter as cut (e.g. drafter_layers '0--1': the "
                                    "target's own depth, made cheap by sparsity alone)")
    sparse_ft_steps: int | None = Field(None, ge=0)
    train_batch_size: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=8)
    calib_samples: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    eval_max_new_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _stages_fit_together(self) -> "PipelineConfig":
        """Field combinations whose stages cannot run together (each named with its fix)."""
        if self.feature_drafter and self.prune:
            raise ValueError("feature_drafter: the prune sweep needs a drafter cut from the target's layers; set "
                             "prune: false (a feature drafter is one layer already)")
        if self.feature_drafter and self.drafter_base:
            raise ValueError("feature_drafter: a feature drafter is built from the target itself; drop drafter_base")
        if self.train_steps == 0 and self.sft_baseline:
            raise ValueError("train_steps: 0 leaves the plain-SFT baseline no budget to match (it trains as long as "
                             "the dense drafter); set sft_baseline: false or train_steps ≥ 1")
        if self.train_steps == 0 and (self.feature_drafter or not self.prune):
            raise ValueError("train_steps: 0 skips dense training, which leaves nothing to evaluate without the prune "
                             "sweep (and a feature drafter is only made by training); set train_steps ≥ 1 or "
                             "prune: true")
        if self.shared_kv and (self.feature_drafter or self.drafter_base):
            raise ValueError("shared_kv: a drafter reads the target's KV cache when it is a copy of the target's "
                             "layers; drop feature_drafter/drafter_base, or set shared_kv: false")
        if self.layer_kd and (not self.prune or self.sparse_ft_steps == 0):
            raise ValueError("layer_kd: the per-layer loss is for the sweep's sparse fine-tuning of a copy of the "
                             "target; set prune: true with sparse_ft_steps ≥ 1, or layer_kd: 0")
        if self.magpie_openers != "none" and "magpie:" not in (self.seed_prompts or ""):
            raise ValueError(f"magpie_openers: {self.magpie_openers} starts self-written seeds, and seed_prompts has "
                             "none; add e.g. +magpie:240 to seed_prompts, or set magpie_openers: none")
        return self

    def resolved(self) -> "PipelineConfig":
        """Fill every None with the profile's value. A drafter of another family (drafter_base) keeps the plain
        recipe's loss and head unless they are given: KD and stored logits need the target's tokenizer."""
        vals = self.model_dump()
        profile = PROFILES[self.profile] | (CROSS_FAMILY if self.drafter_base else {})
        for k, v in profile.items():
            if vals.get(k) is None:
                vals[k] = v
        return PipelineConfig(**vals)

    # The library settings of each stage, from the form's fields (call on a resolved config): the one place where
    # pipeline names meet library names.
    def distill_settings(self, mode: str | None = None, seeds: str | None = None) -> "DistillSettings":
        """For distilling `seeds` (default: seed_prompts) in `mode`."""
        from sd2.data import limit_applies

        mode, seeds = mode or self.distill_mode, seeds or self.seed_prompts
        # a limit no source uses stays out of the settings (and the stage's cache key)
        limit = self.distill_limit if seeds is None or limit_applies(seeds) else None
        return DistillSettings(mode=mode, limit=limit,
                               max_new_tokens=self.distill_max_new_tokens, batch_size=self.distill_batch_size,
                               threads=self.threads, device=self.device, dtype=self.dtype,
                               store_topk=self.distill_store_topk if mode != "reference" else 0,
                               max_prompt_tokens=self.distill_max_prompt_tokens,
                               magpie_openers=self.magpie_openers if mode == "regenerate" else "none",
                               fast_path="fp16" if self.fast_path in ("auto", *FP16_TARGET_PATHS)
                               and self.device in ("auto", "cpu") and mode != "reference" and _cpu_only() else "none")

    def train_settings(self, steps: int | None = None, loss: str | None = None,
                       shared_kv: bool | None = None) -> "TrainSettings":
        steps = steps or self.train_steps
        return TrainSettings(max_steps=steps, batch_size=self.train_batch_size, seq_len=self.seq_len, lr=self.lr,
                             threads=self.threads, save_steps=steps, device=self.device,
                             dtype=resolve_train_dtype(self.train_dtype, self.dtype, self.device),
                             loss=loss or self.train_loss, draft_vocab=self.draft_vocab,
                             shared_kv=self.shared_kv if shared_kv is None else shared_kv,
                             shared_kv_rounds=self.shared_kv_rounds,
                             freeze_embeddings=self.freeze_embeddings, packing=self.packing,
                             feature_drafter=self.feature_drafter, feature_noise=self.feature_noise,
                             feature_reads=self.feature_reads, feature_unroll=self.feature_unroll)

    def derive_settings(self) -> "LayerPruneSettings":
        return LayerPruneSettings(keep_layers=self.drafter_layers, dtype=self.dtype)

    def layer_match_settings(self) -> "LayerPruneSettings":
        return LayerPruneSettings(calib_samples=self.calib_samples, seq_len=self.seq_len, device=self.device,
                                  dtype=self.dtype)


class EvalSettings(_Base):
    """How the drafters of a pipeline or sweep are evaluated (a sub-form of the Prefect UI)."""

    renamed: ClassVar[dict[str, str]] = {"more_gammas": "eval_gammas", "gamma_mode": "eval_gamma_mode"}

    target: str = DEFAULT_TARGET
    prompts: str | None = None
    limit: int = Field(8, ge=1)
    gamma: Gamma = 4
    max_new_tokens: int = Field(48, ge=1)
    threads: int = Field(1, ge=1)
    device: Device = "auto"
    dtype: DType = "auto"
    uag: bool = Field(False, description="drafters may use another tokenizer (Universal Assisted Generation)")
    fast_path: FastPath = Field("auto", description="numeric path of evaluation (see `sd2 eval --fast-path`)")
    draft_threshold: float | None = Field(None, gt=0, lt=1, description="dynamic draft length (see `sd2 eval`)")
    lookup: int = Field(0, ge=0, le=LOOKUP_MAX, description="prompt lookup in front of the drafter (see `sd2 eval`)")
    prompt_vocab: bool = Field(False, description="compact draft heads score each prompt's tokens (see `sd2 eval`)")
    eval_gammas: list[Gamma] = Field(default_factory=list, description="more γ values, greedy")
    eval_gamma_mode: Literal["replay", "engine"] = Field(
        "replay", description="how eval_gammas are measured: exact greedy replay, or a full run each (UAG: engine)")
    replay_limit: int | None = Field(None, ge=1, description="prompts for replayed γ (default: limit); set, the "
                                     "headline MAL at γ is replayed over them too, with or without eval_gammas")
    sampling_temperature: float | None = Field(None, gt=0, description="one more run at this temperature")
    sampling_drafters: list[str] = Field(default_factory=list, description="drafter names for it; empty = all")

    def options(self, gamma: int | None = None, temperature: float = 0.0, **more) -> EvalOptions:
        """The library's evaluation options for one run of these settings."""
        return EvalOptions(gamma=gamma or self.gamma, max_new_tokens=self.max_new_tokens, temperature=temperature,
                           limit=self.limit, threads=self.threads, uag=self.uag, fast_path=self.fast_path,
                           draft_threshold=self.draft_threshold, lookup=self.lookup, device=self.device,
                           prompt_vocab=self.prompt_vocab,
                           dtype=self.dtype, **more)


class SweepConfig(_Base):
    """A sparsity sweep over a trained drafter: each cell is prune → sparse fine-tune (→ evaluated later)."""

    renamed: ClassVar[dict[str, str]] = {"grid": "sweep", "ft_steps": "sparse_ft_steps",
                                         "batch_size": "train_batch_size"}

    target: str = DEFAULT_TARGET
    drafter: str = Field(..., description="dense drafter dir to prune (e.g. a self-distilled one)")
    data: str = Field(..., description="distilled dataset dir: calibration and sparse fine-tuning data")
    sweep: SweepGrid = SweepGrid()
    calib_samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)
    sparse_ft_steps: int = Field(30, ge=0)
    train_batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0, le=1.0)
    train_loss: Literal["sft", "kd"] = Field("sft", description="loss of sparse fine-tuning (kd: the target's "
                                             "logits, stored ones when the data has them)")
    packing: bool = Field(False, description="pack sparse fine-tuning examples into full seq_len blocks")
    draft_vocab: int = Field(0, ge=0, description="give a cell that has a full-size head a compact one of K target "
                             "tokens while it is sparse fine-tuned (0: none; drafters that have one keep it)")
    layer_kd: float = Field(0.0, ge=0, description="weight of a per-layer hidden-state loss against the target "
                            "while sparse fine-tuning (cells as deep as the target); 0 = off")
    shared_kv: bool = Field(False, description="sparse fine-tune cells to read the target's KV cache (cells as deep "
                            "as the target; sd2.sharedkv)")
    shared_kv_rounds: int = Field(1, ge=1, le=16, description="shared_kv: positions per training draft round")
    threads: int = Field(1, ge=1)
    device: Device = "auto"
    dtype: DType = "auto"
    train_dtype: TrainDType | None = Field(None, description="precision of sparse fine-tuning (default: dtype; fast: "
                                           "bfloat16 where this machine runs it natively, else float32)")
    cell_deployment: str | None = None
    eval: EvalSettings | None = Field(None, description="evaluate the cells (and log to MLflow) when given")

    def prune_settings(self, cell: dict) -> PruneSettings:
        return PruneSettings(method=cell["method"], pattern=cell["pattern"], sparsity=cell["sparsity"],
                             allocation=cell["allocation"], owl_lambda=self.sweep.owl_lambda,
                             owl_m=self.sweep.owl_m,
                             calib_samples=self.calib_samples, seq_len=self.seq_len, threads=self.threads,
                             device=self.device, dtype=self.dtype)

    def train_settings(self) -> TrainSettings:
        """Sparse fine-tuning of a cell (the masks of the pruned model are kept)."""
        return TrainSettings(max_steps=max(self.sparse_ft_steps, 1), batch_size=self.train_batch_size,
                             seq_len=self.seq_len, lr=self.lr, threads=self.threads, loss=self.train_loss,
                             packing=self.packing, draft_vocab=self.draft_vocab, layer_kd=self.layer_kd,
                             shared_kv=self.shared_kv, shared_kv_rounds=self.shared_kv_rounds,
                             save_steps=max(self.sparse_ft_steps, 1), device=self.device,
                             dtype=resolve_train_dtype(self.train_dtype, self.dtype, self.device))
