"""Drafter fine-tuning with the HF Trainer: loss on response tokens only, cosine schedule, checkpoints,
resume; DeepSpeed ZeRO when a config is given (multi-process runs are launched with torchrun as a
subprocess). Zeros in the init model's linear weights are sparsity masks and are kept exactly.

Run as `python -m sd2.train CONFIG.json` inside each rank of a distributed launch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sd2 import draftvocab, eagle, sharedkv
from sd2.config import TrainConfig
from sd2.data import encode_prompt, load_distilled
from sd2.errors import UserError
from sd2.io import write_json
from sd2.models import check_output_dir, load_model, same_tokenizer
from sd2.progress import trainer_callback as progress_callback

log = logging.getLogger(__name__)
IGNORE = -100


# ---------------------------------------------------------------------------------------------- data


def build_examples(ds, tok, seq_len: int, packing: bool = False, use_ids: bool = True,
                   teacher: bool = False) -> tuple[list[dict], dict]:
    """Tokenize (chat-templated prompt, response + EOS); labels only on the response. Prompts longer than half of
    `seq_len` keep their last half-`seq_len` tokens (truncated, not dropped). With `use_ids` the target's own
    response ids (stored by distill) are used as they are; with `teacher` each example carries the stored top-k
    logits aligned with its labels. Returns (examples, counts)."""
    eos = tok.eos_token_id
    examples, counts = [], {"rows": 0, "prompt_truncated": 0, "response_truncated": 0}
    ids_col = use_ids and "response_ids" in (getattr(ds, "column_names", None) or (list(ds[0]) if len(ds) else []))
    for row in ds:
        counts["rows"] += 1
        p = encode_prompt(tok, row["prompt"])
        # an answer cut at the token limit did not end: no EOS after it (the drafter would learn to stop there)
        ended = not row.get("truncated", False)
        if ids_col:
            r = list(row["response_ids"])
        else:
            r = tok.encode(row["response"], add_special_tokens=False)
        r += [eos] if ended and eos is not None else []
        if not packing and len(p) > seq_len // 2:
            p = p[-(seq_len // 2):]
            counts["prompt_truncated"] += 1
        ex = {"input_ids": p + r, "labels": [IGNORE] * len(p) + r}
        if teacher:  # one top-k row per response position (the generated tokens, then EOS if it ended)
            n = min(len(r), len(row["topk_ids"]))
            ex["topk_ids"] = [None] * len(p) + list(row["topk_ids"][:n]) + [None] * (len(r) - n)
            ex["topk_logits"] = [None] * len(p) + list(row["topk_logits"][:n]) + [None] * (len(r) - n)
        if not packing:
            counts["response_truncated"] += int(len(ex["input_ids"]) > seq_len)
            ex = {k: v[:seq_len] for k, v in ex.items()}
        examples.append(ex)
    return (pack(examples, seq_len) if packing else examples), counts


def pack(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples and cut the stream into `seq_len` blocks (lists and per-position tensors alike)."""
    packed, cur = [], None
    for ex in examples:
        cur = dict(ex) if cur is None else {k: (torch.cat([v, ex[k]]) if torch.is_tensor(v) else v + ex[k])
                                            for k, v in cur.items()}
        while len(cur["input_ids"]) >= seq_len:
            packed.append({k: v[:seq_len] for k, v in cur.items()})
            cur = {k: v[seq_len:] for k, v in cur.items()}
    if cur is not None and len(cur["input_ids"]):
        packed.append(cur)
    return packed


class Collator:
    """Right-pads a batch; padding gets label -100 and attention 0. Stored teacher rows become [B, T, k] tensors
    (positions without one are masked by their label)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        k = next((len(r) for b in batch for r in b.get("topk_ids", []) if r is not None), 0)
        if k:
            out["topk_ids"] = torch.zeros((len(batch), width, k), dtype=torch.long)
            out["topk_logits"] = torch.full((len(batch), width, k), float("-inf"))
        if "feats" in batch[0]:  # a feature drafter's inputs: the target's hidden states, zeros on padding
            out["feats"] = torch.zeros((len(batch), width, batch[0]["feats"].shape[-1]))
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            if "feats" in b:
                out["feats"][i, :n] = b["feats"].float()
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
            rows = [j for j, r in enumerate(b.get("topk_ids", [])) if r is not None]
            if k and rows:
                out["topk_ids"][i, rows] = torch.tensor([b["topk_ids"][j] for j in rows])
                out["topk_logits"][i, rows] = torch.tensor([b["topk_logits"][j] for j in rows])
        return out


# ------------------------------------------------------------------------------------------- masks


class SparsityMasks:
    """Zeros of the init model's linear weights, kept through training: gradients are masked and the
    weights (and, under DeepSpeed, the fp32 master copies) are re-masked after every optimizer step."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @classmethod
    def from_model(cls, model: nn.Module, pruned_layers: set[str] | None = None,
                   min_zero_share: float = 0.05) -> "SparsityMasks":
        """Masks for the layers `sd2 prune` recorded (sparsity.json), and for any linear layer whose zero share
        reaches `min_zero_share` — the stray exact zeros of a dequantized checkpoint (≈0.5% for Q4 GGUF)
        are not a sparsity pattern and stay trainable."""
        masks = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                zero = mod.weight.detach() == 0
                share = float(zero.float().mean())
                if share > 0 and (share >= min_zero_share or (pruned_layers and name in pruned_layers)):
                    masks[name] = ~zero
        return cls(masks)

    def __bool__(self) -> bool:
        return bool(self.masks)

    def _params(self, model: nn.Module):
        for name, mask in self.masks.items():
            yield model.get_submodule(name).weight, mask

    def hook_gradients(self, model: nn.Module) -> None:
        for p, mask in self._params(model):
            p.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype))

    @torch.no_grad()
    def apply(self, model: nn.Module, deepspeed_engine=None) -> None:
        for p, mask in self._params(model):
            if deepspeed_engine is not None:
                from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

                full = safe_get_full_fp32_param(p)
                if full is not None:
                    safe_set_full_fp32_param(p, full * mask.to(full.device, full.dtype))
            if p.numel() == mask.numel():  # ZeRO-3 partitions leave an empty local tensor
                p.mul_(mask.to(p.device, p.dtype))

    def regrown(self, model: nn.Module) -> int:
        """Weights that were zero at init and are nonzero now (must be 0)."""
        return sum(int(((p.detach() != 0) & ~m.to(p.device)).sum()) for p, m in self._params(model))

    def density(self) -> float:
        tot = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / tot if tot else 1.0


# ------------------------------------------------------------------------------------------- losses


def topk_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
                 labels: torch.Tensor, divergence: str = "fkl") -> torch.Tensor:
    """KD from stored top-k teacher logits: the teacher's distribution renormalised over its k best tokens (all
    the mass it is sure of), against the student's full softmax. `topk_*[:, j]` is the teacher at the position
    that predicts labels[:, j] (what generation stored); ids < 0 (outside a draft vocabulary) carry no mass."""
    sel = labels[:, 1:] != IGNORE
    s = student_logits[:, :-1][sel].float()
    if s.numel() == 0:
        return student_logits.sum() * 0
    ids = topk_ids[:, 1:][sel]
    t = topk_logits[:, 1:][sel].float().masked_fill(ids < 0, float("-inf"))
    keep = torch.isfinite(t).any(-1)  # a position whose whole top-k lies outside the draft vocabulary: no signal
    s, ids, t = s[keep], ids[keep].clamp(min=0), t[keep]
    if s.numel() == 0:
        return student_logits.sum() * 0
    p = torch.softmax(t, -1)
    s_logp = torch.log_softmax(s, -1)
    if divergence == "fkl":
        return (p * (torch.log(p.clamp_min(1e-30)) - s_logp.gather(-1, ids))).sum(-1).mean()
    if divergence == "tv":  # top-k part + the student's mass outside the teacher's top-k
        q = s_logp.gather(-1, ids).exp()
        return 0.5 * ((p - q).abs().sum(-1) + (1 - q.sum(-1)).clamp_min(0)).mean()
    raise ValueError(f"unknown divergence {divergence!r}")


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on response positions (labels already in the head's index space). A batch without
    any (packed blocks of long prompts; labels all outside a draft vocabulary) gives 0, not NaN, as the KD losses."""
    sel = labels[:, 1:] != IGNORE
    if not sel.any():
        return logits.sum() * 0
    return F.cross_entropy(logits[:, :-1][sel].float(), labels[:, 1:][sel])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            divergence: str = "fkl") -> torch.Tensor:
    """Token-level distillation on response positions (DistillSpec): forward KL(teacher‖student) or TV."""
    sel = labels[:, 1:] != IGNORE
    s = student_logits[:, :-1][sel].float()
    t = teacher_logits[:, :-1][sel].float()
    if s.numel() == 0:
        return student_logits.sum() * 0
    t_logp = F.log_softmax(t, -1)
    s_logp = F.log_softmax(s, -1)
    if divergence == "fkl":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    if divergence == "tv":
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1).mean()
    raise ValueError(f"unknown divergence {divergence!r}")


# ------------------------------------------------------------------------------------------- launch


def layer_kd_loss(hidden: tuple[torch.Tensor, ...], teacher: nn.Module, inputs: dict) -> torch.Tensor:
    """SquareHead (Kurtic et al., 2023): mean over layers of ||h_s - h_t||² / ||h_t||² on the real tokens, so every
    layer's error counts alike whatever its scale; the teacher's body runs without its head (no logits)."""
    body = getattr(teacher, "model", teacher).to(hidden[-1].device)
    with torch.no_grad():
        t_hidden = body(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        output_hidden_states=True).hidden_states
    keep = inputs["attention_mask"].unsqueeze(-1).to(hidden[-1].dtype)
    terms = [((s - t) ** 2 * keep).sum() / ((t ** 2) * keep).sum().clamp_min(1e-6)
             for s, t in zip(hidden[1:], t_hidden[1:])]
    return torch.stack(terms).mean()


def _validate_deepspeed(cfg: TrainConfig) -> dict | None:
    if cfg.deepspeed is None:
        return None
    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise UserError(f"--deepspeed {path}: file not found (see infra/deepspeed/zero2.json)")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"--deepspeed {path}: invalid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(ds, dict) or "zero_optimization" not in ds:
        raise UserError(f"--deepspeed {path}: expected a DeepSpeed config object with 'zero_optimization'")
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Validate, then train in-process (one device) or launch `num_gpus` ranks with torchrun and wait."""
    out = Path(cfg.out)
    work = _work_dir(out)
    where = _placement(cfg)  # an impossible device request fails before anything else
    if not cfg.resume:
        check_output_dir(out, cfg.overwrite)
        if work.exists() and not cfg.overwrite:
            raise UserError(f"{work}: an unfinished training run is there; pass --resume to continue it "
                            "or --overwrite to start over")
    _stored_teacher(cfg, load_distilled(cfg.data))  # fail fast on a bad data dir, before any process starts
    for extra in cfg.extra_data:
        load_distilled(extra)
    _check_draft_vocab(cfg)
    if cfg.layer_kd:
        _check_layer_kd(cfg)
    if cfg.shared_kv:
        _check_shared_kv(cfg)
    _validate_deepspeed(cfg)
    gpus = torch.cuda.device_count() if where.is_cuda else 0
    on_cpu = gpus == 0
    if cfg.device.startswith("cuda:") and cfg.num_gpus > 1:
        raise UserError(f"--device {cfg.device}: one GPU pinned, but --num-gpus {cfg.num_gpus}; use --device cuda "
                        "(all visible GPUs) or --num-gpus 1")
    if cfg.num_gpus > max(gpus, 1) or (gpus and cfg.num_gpus > gpus):
        if not (on_cpu and cfg.cpu_fallback):
            raise UserError(f"--num-gpus {cfg.num_gpus}: only {gpus} GPU(s) here; lower it, or pass --cpu-fallback "
                            "to run that many CPU ranks (gloo)")
        log.warning("no GPU: running %d CPU ranks (gloo) instead of GPUs", cfg.num_gpus)
    if cfg.overwrite and not cfg.resume:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.num_gpus == 1 and "WORLD_SIZE" not in os.environ:
        return train_worker(cfg, progress=progress)
    work.mkdir(parents=True, exist_ok=True)
    cfg_file = work / "train_config.json"
    cfg_file.write_text(cfg.model_dump_json(indent=2))
    env = dict(os.environ)
    if on_cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(cfg.threads or 1), CUDA_VISIBLE_DEVICES="")
        if not cfg.deepspeed:
            env["ACCELERATE_USE_CPU"] = "true"  # plain DDP over gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.num_gpus),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "sd2.train", str(cfg_file)]
    log.info("launching %d ranks: %s", cfg.num_gpus, " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}); checkpoints kept in {work}")
    if not (out / "config.json").exists():
        raise RuntimeError(f"distributed training finished but wrote no model to {out}")
    return out


def _placement(cfg: TrainConfig):
    """Device and precision of training: fp32 master weights, the requested dtype as mixed precision (autocast),
    and the saved weights in that dtype. fp16 mixed precision needs a GPU (its loss scaling is CUDA-only)."""
    from sd2 import device as devices

    where = devices.plan(cfg.device, cfg.dtype, devices.visible_gpus())
    if where.dtype == "float16" and not where.is_cuda:
        raise UserError("--dtype float16: fp16 mixed-precision training needs a GPU; use bfloat16 or float32 on the "
                        "CPU")
    return where


class MaskKeeper:
    """TrainerCallback that re-applies the sparsity masks after every optimizer step (also on DeepSpeed's
    partitioned fp32 master weights). `trainer` is set once the trainer exists."""

    def __init__(self, masks: "SparsityMasks"):
        from transformers import TrainerCallback

        self.masks, self.trainer = masks, None
        self.callback = type("_MaskCallback", (TrainerCallback,), {"on_step_end": self._on_step_end})()

    def _on_step_end(self, args, state, control, **kw):
        self.masks.apply(self.trainer.model, getattr(self.trainer, "deepspeed", None))


def _curve_callback(curve_dir: Path, tok):
    """TrainerCallback writing the drafter at every save step to curve_dir/step-N (a loadable model dir)."""
    from transformers import TrainerCallback

    from sd2.models import save_model

    class _Curve(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kw):
            if state.is_world_process_zero and model is not None:
                save_model(model, tok, Path(curve_dir) / f"step-{state.global_step}", overwrite=True)
    return _Curve()


def _trainer_class():
    """HF Trainer whose loss knows the drafter's head (full or compact) and the teacher: SFT, KD from stored top-k
    logits (`stored_teacher`), or KD from a live teacher (`teacher`)."""
    from transformers import Trainer

    class SD2Trainer(Trainer):
        teacher, stored_teacher, kd_divergence = None, False, "fkl"
        teacher_head = None  # a feature drafter's live teacher: the target's head, applied to the target's features
        feature_weight, feature_noise, feature_unroll = 1.0, 0.0, False
        # the target, for the per-layer hidden-state loss / whose KV cache a shared-KV drafter reads (sd2.sharedkv)
        layer_teacher, layer_kd, kv_teacher, kv_rounds = None, 0.0, None, 1

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "feats" in inputs:
                outputs, loss = self._feature_drafter_loss(model, inputs)
            else:
                more, t_logits = _shared_kv_inputs(self, inputs) if self.kv_teacher is not None else ({}, None)
                outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=bool(self.layer_kd), **more)
                def live():  # the teacher's logits (already computed with the target's K/V when it is that model)
                    return t_logits if t_logits is not None else self.teacher.to(outputs.logits.device)(
                        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                loss = self._token_loss(outputs.logits, inputs["labels"], inputs.get("topk_ids"),
                                        inputs.get("topk_logits"), live if self.teacher is not None else None)
                if self.layer_kd:
                    loss = loss + self.layer_kd * layer_kd_loss(outputs.hidden_states, self.layer_teacher, inputs)
            return (loss, outputs) if return_outputs else loss

        def _token_loss(self, logits, labels, topk_ids, topk_logits, live, live_compact: bool = False):
            """SFT, KD from stored top-k logits, or KD from `live()` teacher logits (full vocabulary, or already
            the draft vocabulary's with `live_compact`)."""
            dmap = draftvocab.draft_ids(self.model)
            vocab = getattr(self.model, "sd2_full_vocab", None)
            if dmap is not None:  # labels (and teacher ids) into the compact head's index space
                labels = draftvocab.to_draft(labels, dmap, vocab, missing=IGNORE)
            if self.stored_teacher:
                if dmap is not None:
                    topk_ids = draftvocab.to_draft(topk_ids, dmap, vocab, missing=-1)
                return topk_kd_loss(logits, topk_ids, topk_logits, labels, self.kd_divergence)
            if live is not None:
                with torch.no_grad():
                    t_logits = live()
                if dmap is not None and not live_compact:
                    t_logits = t_logits[..., dmap.to(t_logits.device)]
                return kd_loss(logits, t_logits, labels, self.kd_divergence)
            return sft_loss(logits, labels)

        def _feature_drafter_loss(self, model, inputs):
            """sd2.eagle: pair j = (x_{j+1}, f_j) drafts x_{j+2}; token loss on that, plus smooth-L1 of the
            drafter's feature against the target's f_{j+1} (the feature its next draft step reads)."""
            ids, labels, mask, feats = inputs["input_ids"], inputs["labels"], inputs["attention_mask"], inputs["feats"]
            fin = feats[:, :-1]
            if self.feature_noise and model.training:
                fin = fin + torch.randn_like(fin) * self.feature_noise
            if self.feature_unroll:  # training-time test: the second draft step reads the drafter's own feature
                outputs, logits, h, logits2 = eagle.unrolled_forward(model, ids, fin, mask)
            else:
                outputs = model(input_ids=ids[:, 1:], feats=fin, attention_mask=mask[:, 1:])
                logits, h = outputs.logits, outputs.hidden_states[0]
            loss = self._feature_token_loss(logits, inputs, feats, 1)
            if self.feature_unroll:
                loss = loss + self._feature_token_loss(logits2, inputs, feats, 2)
            if self.feature_weight:
                loss = loss + self.feature_weight * eagle.feature_loss(h[:, :-1], feats[:, 1:-1, -h.shape[-1]:],
                                                                       labels[:, 2:] != IGNORE)
            return outputs, loss

        def _feature_token_loss(self, logits, inputs, feats, step: int):
            """Token loss of draft step `step`: its logits at pair i predict token i + step + 1."""
            shift = {k: inputs[k][:, step:] for k in ("topk_ids", "topk_logits") if k in inputs}
            if self.teacher_head is not None and self.teacher_head.device != feats.device:
                self.teacher_head = self.teacher_head.to(feats.device)  # once, not every step
            head, dmap = self.teacher_head, draftvocab.draft_ids(self.model)
            if head is not None and dmap is not None:
                head = head[dmap.to(head.device)]  # the teacher over the draft vocabulary only
            final = feats[:, step:, -head.shape[-1]:] if head is not None else None  # the final normed state
            live = (lambda: F.linear(final, head)) if head is not None else None
            return self._token_loss(logits, inputs["labels"][:, step:], shift.get("topk_ids"),
                                    shift.get("topk_logits"), live, live_compact=True)
    return SD2Trainer


def _shared_kv_inputs(trainer, inputs: dict) -> tuple[dict, torch.Tensor | None]:
    """A shared-KV drafter's extra forward inputs: the target's K/V from one no-grad pass (its logits too when KD
    runs live from the same model), and where this step's draft rounds start."""
    trainer.kv_teacher = trainer.kv_teacher.to(inputs["input_ids"].device)
    kv, t_logits = sharedkv.target_kv(trainer.kv_teacher, inputs["input_ids"], inputs["attention_mask"],
                                      logits=trainer.teacher is trainer.kv_teacher)
    rounds = trainer.kv_rounds
    return {"sd2_target_kv": kv, "sd2_rounds": rounds, "sd2_offset": int(torch.randint(rounds, ()))}, t_logits


def _pair_configs(cfg: TrainConfig, flag: str) -> tuple:
    """The teacher's and the drafter's model configs (`--kd-target` or the data's target; `--init`), for checks
    that pair the drafter's layers with the target's before any model is loaded."""
    from transformers import AutoConfig

    from sd2.models import resolve_spec

    return tuple(AutoConfig.from_pretrained(resolve_spec(s, cfg.load.allow_pickle))
                 for s in (cfg.kd_target or _data_target(cfg.data, flag), cfg.init))


def _check_layer_kd(cfg: TrainConfig) -> None:
    """--layer-kd pairs layer i of the drafter with layer i of the teacher: both must have the same depth and width
    (checked on the configs, before any model is loaded)."""
    if cfg.feature_drafter:
        raise UserError("--layer-kd: a feature drafter has its own layers, not the target's; use --feature-weight")
    t, d = (c.get_text_config() for c in _pair_configs(cfg, "--layer-kd"))
    if (t.num_hidden_layers, t.hidden_size) != (d.num_hidden_layers, d.hidden_size):
        raise UserError(f"--layer-kd: the drafter has {d.num_hidden_layers} layers of width {d.hidden_size}, the "
                        f"teacher {t.num_hidden_layers} of {t.hidden_size}; use it on a drafter as deep as the target "
                        "(e.g. a pruned copy), or --layer-kd 0")


def _check_shared_kv(cfg: TrainConfig) -> None:
    """--shared-kv: the drafter's layer i reads the target's layer i cache (checked on the configs)."""
    if cfg.feature_drafter:
        raise UserError("--shared-kv: a feature drafter reads the target's hidden state, not its KV cache; drop one")
    target, drafter = _pair_configs(cfg, "--shared-kv")
    sharedkv.check_pair(target, drafter, kept=_kept_layers(cfg, target))


def _kept_layers(cfg: TrainConfig, target_config) -> list[int] | None:
    """The target layers a layer-sliced --init was cut from (its sd2_layers.json): the caches its layers read."""
    from sd2.models import resolve_spec

    return sharedkv.kept_layers(resolve_spec(cfg.init, cfg.load.allow_pickle),
                                target_config.get_text_config().num_hidden_layers)


def _set_losses(trainer, cfg: TrainConfig, where, tok, stored: bool, teacher_head) -> None:
    """The trainer's loss settings and teachers: stored logits, a live teacher, a feature drafter's teacher head,
    the body the per-layer loss compares with (one teacher model serves both)."""
    trainer.feature_weight, trainer.feature_noise = cfg.feature_weight, cfg.feature_noise
    trainer.feature_unroll = cfg.feature_unroll
    if cfg.loss == "kd":
        trainer.kd_divergence, trainer.stored_teacher = cfg.kd_divergence, stored
        if teacher_head is not None:
            trainer.teacher_head = teacher_head
        elif not stored:
            trainer.teacher = _teacher(cfg, where, tok)
    if cfg.layer_kd:
        trainer.layer_kd = cfg.layer_kd
        trainer.layer_teacher = trainer.teacher or _teacher(cfg, where, tok)
    if cfg.shared_kv:
        trainer.kv_teacher = trainer.teacher or trainer.layer_teacher or _teacher(cfg, where, tok)
        trainer.kv_rounds = cfg.shared_kv_rounds


def _teacher(cfg: TrainConfig, where, tok):
    """The KD teacher, replicated on each rank's device in the training dtype (no gradients, no optimizer state);
    targets larger than one GPU need precomputed teacher logits instead."""
    from sd2.device import Placement

    spec = cfg.kd_target or _data_target(cfg.data)
    rank_dev = f"cuda:{os.environ.get('LOCAL_RANK', where.device.split(':')[-1])}" if where.is_cuda else "cpu"
    teacher, ttok = load_model(spec, placement=Placement(rank_dev, where.dtype))
    if not same_tokenizer(tok, ttok):
        raise UserError(f"--loss kd: teacher {spec!r} has another tokenizer than the drafter")
    return teacher.requires_grad_(False)


def _training_args(cfg: TrainConfig, where, work: Path, progress: bool):
    from transformers import TrainingArguments

    on_cpu = not where.is_cuda
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accel_cfg = None
    if cfg.deepspeed and on_cpu and distributed:
        # accelerate only starts DeepSpeed's process group with a backend on accelerator devices; on CPU
        # ranks (tests, CPU-only boxes) we configure the shared state ourselves with gloo.
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        accel_cfg = {"use_configured_state": True}
    return TrainingArguments(
        output_dir=str(work / "checkpoints"), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type="cosine",
        warmup_steps=int(round(cfg.warmup_ratio * cfg.max_steps)), weight_decay=cfg.weight_decay,
        logging_steps=max(1, min(10, cfg.max_steps // 20)), save_steps=cfg.save_steps, save_total_limit=2,
        # With DeepSpeed on CPU (DS_ACCELERATOR=cpu), use_cpu must stay off or accelerate silently uses DDP.
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=on_cpu and not cfg.deepspeed,
        deepspeed=str(cfg.deepspeed) if cfg.deepspeed else None, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=not progress,
        ddp_backend="gloo" if on_cpu and distributed and not cfg.deepspeed else None,
        max_grad_norm=1.0, save_only_model=False, accelerator_config=accel_cfg,
        bf16=where.dtype == "bfloat16", fp16=where.dtype == "float16",
    )


def train_worker(cfg: TrainConfig, progress: bool = True) -> Path:
    """The training itself; runs in the current process (one rank of a distributed launch, or alone)."""
    from transformers import set_seed

    out = Path(cfg.out)
    work = _work_dir(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    where = _placement(cfg)
    if where.is_cuda and "LOCAL_RANK" not in os.environ:
        torch.cuda.set_device(torch.device(where.device))  # a pinned GPU (cuda:N) for the in-process run
    model, tok = load_model(cfg.init, allow_pickle=cfg.load.allow_pickle, trust_remote_code=cfg.load.trust_remote_code)
    target = None
    if cfg.feature_drafter:  # --init is the target: the drafter is built from it and reads its features
        target, model = model, eagle.build(model, cfg.feature_layer, cfg.feature_layers, tuple(cfg.feature_reads))
    model.train()
    if cfg.shared_kv:  # trained as it drafts: over the target's keys and values (marked in its config)
        layers = sharedkv.kv_layers(model.config, _kept_layers(cfg, _pair_configs(cfg, "--shared-kv")[0]))
        sharedkv.use_for_training(model, layers)
        sharedkv.mark(model, layers)
    ds = load_distilled(cfg.data)
    stored = _stored_teacher(cfg, ds)
    parts, counts = [], {}  # the examples of --data and of each --extra-data
    for d in [cfg.data, *cfg.extra_data]:
        ex, cnt = build_examples(ds if d == cfg.data else load_distilled(d), tok, cfg.seq_len,
                                 cfg.packing and target is None, use_ids=_same_tokenizer_as_data(d, tok),
                                 teacher=stored)
        parts.append(ex)
        counts = {k: counts.get(k, 0) + v for k, v in cnt.items()}
    examples = [e for part in parts for e in part]
    teacher_head = None
    if target is not None:
        teacher_head = target.get_output_embeddings().weight.detach().float().clone() \
            if cfg.loss == "kd" and not stored else None
        examples = _with_features(cfg, where, target, model, parts, progress)
        del target
    if counts["prompt_truncated"]:
        log.info("%d prompt(s) longer than half of --seq-len %d kept their last tokens", counts["prompt_truncated"],
                 cfg.seq_len)
    if cfg.draft_vocab and draftvocab.draft_ids(model) is None:
        # counted on --data: the target's own tokens (extra data may be others' text)
        ids = draftvocab.choose(draftvocab.token_counts(ds, tok, use_ids=_same_tokenizer_as_data(cfg.data, tok)),
                                cfg.draft_vocab,
                                model.get_output_embeddings().weight.shape[0],
                                always={tok.eos_token_id} if tok.eos_token_id is not None else set())
        draftvocab.compact_head(model, ids)
        log.info("draft vocabulary: %d of %d tokens", len(ids), model.sd2_full_vocab)
    if cfg.freeze_embeddings or (cfg.feature_drafter and cfg.feature_freeze):
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.feature_drafter and cfg.feature_freeze:  # EAGLE's choice: the target's own embeddings and head
        model.get_output_embeddings().weight.requires_grad_(False)
    # a feature drafter is built fresh (its fc starts as [I | I]: zeros that are not a sparsity pattern)
    masks = SparsityMasks({}) if cfg.feature_drafter else SparsityMasks.from_model(model, _pruned_layers(cfg.init))
    keeper = None
    if masks:
        log.info("keeping sparsity masks on %d linear layers (density %.3f)", len(masks.masks), masks.density())
        masks.hook_gradients(model)
        keeper = MaskKeeper(masks)
    args = _training_args(cfg, where, work, progress)
    callbacks = ([keeper.callback] if keeper else []) + ([_curve_callback(cfg.curve_dir, tok)] if cfg.curve_dir
                                                         else [])
    if not progress:  # no bar: steps, loss and time left as log lines (a flow's stage in the Prefect UI)
        callbacks.append(progress_callback(cfg.max_steps, desc=f"train ({cfg.loss})"))
    trainer = _trainer_class()(model=model, args=args, train_dataset=examples, data_collator=Collator(
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id), callbacks=callbacks)
    _set_losses(trainer, cfg, where, tok, stored, teacher_head)
    if keeper:
        keeper.trainer = trainer
    resume_from = None
    if cfg.resume:
        last = last_complete_checkpoint(work / "checkpoints")
        resume_from = str(last) if last else None
        if resume_from:
            log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    _publish(cfg, where, trainer, tok, masks, result, examples, counts, out, work)
    return out


def _with_features(cfg: TrainConfig, where, target, drafter, parts: list[list[dict]], progress: bool) -> list[dict]:
    """A feature drafter's examples: the target's features attached (computed once, in bf16 where that is fast,
    cached on disk per data source, so a variant that changes the distilled data reuses the seed answers'
    features), then packed."""
    from sd2.models import model_digest, sd2_home

    fdtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.feature_dtype]
    target.to(fdtype or eagle.fast_feature_dtype(where.device))
    for part in parts:
        eagle.attach_features(target, part, progress=progress, cache_dir=sd2_home() / "cache" / "features",
                              target_digest=model_digest(cfg.init), reads=eagle.feature_layers(drafter.config))
    examples = [e for part in parts for e in part]
    return pack(examples, cfg.seq_len) if cfg.packing else examples


def _check_draft_vocab(cfg: TrainConfig) -> None:
    if not cfg.draft_vocab:
        return
    from transformers import AutoConfig

    from sd2.models import resolve_spec

    mcfg = AutoConfig.from_pretrained(resolve_spec(cfg.init, allow_pickle=cfg.load.allow_pickle))
    draftvocab.check_size(cfg.draft_vocab, (getattr(mcfg, "text_config", None) or mcfg).vocab_size)


def _stored_teacher(cfg: TrainConfig, ds) -> bool:
    """Whether KD reads the top-k logits stored with the data; a stored teacher must be the asked-for target."""
    if cfg.loss != "kd" or cfg.kd_teacher == "live" or (cfg.feature_drafter and cfg.kd_teacher == "auto"):
        return False  # a feature drafter's live teacher is free: the target's head on the features it reads
    has = "topk_ids" in ds.column_names
    if not has:
        if cfg.kd_teacher == "stored":
            raise UserError(f"--kd-teacher stored: {cfg.data} has no stored teacher logits; distill with --store-topk "
                            "K, or use --kd-teacher live")
        return False
    if cfg.extra_data:
        raise UserError("--extra-data: stored teacher logits are read from --data only; use --kd-teacher live "
                        "(or drop --extra-data)")
    if cfg.kd_target:
        from sd2.models import model_digest

        manifest = json.loads((Path(cfg.data) / "sd2_manifest.json").read_text())
        if model_digest(cfg.kd_target) != manifest.get("target_digest"):
            raise UserError(f"--kd-target {cfg.kd_target}: the teacher logits stored in {cfg.data} come from another "
                            f"model ({manifest.get('target')}); use --kd-teacher live, or distill with this target")
    return True


def _same_tokenizer_as_data(data: Path, tok) -> bool:
    """Whether the data's stored response ids are in this drafter's vocabulary (same tokenizer as the target)."""
    manifest = Path(data) / "sd2_manifest.json"
    target = json.loads(manifest.read_text()).get("target") if manifest.exists() else None
    if not target:
        return False
    from sd2.models import load_tokenizer

    try:
        return same_tokenizer(tok, load_tokenizer(target))
    except UserError:
        return False


def _publish(cfg: TrainConfig, where, trainer, tok, masks, result, examples, counts: dict, out: Path,
             work: Path) -> None:
    """Save the trained drafter (in the requested dtype) with its training record, then rename it into place."""
    final_tmp = work / "final"
    regrown = masks.regrown(trainer.model) if masks and trainer.is_world_process_zero() else 0
    if regrown:
        raise RuntimeError(f"{regrown} masked weights became nonzero during training")
    if where.dtype != "float32" and getattr(trainer, "deepspeed", None) is None:
        trainer.model.to(where.torch_dtype)  # saved in the requested dtype (DeepSpeed saves its 16-bit weights)
    trainer.save_model(str(final_tmp))  # all ranks: ZeRO-3 gathers the full weights here
    if not trainer.is_world_process_zero():
        return
    tok.save_pretrained(final_tmp)
    dmap = draftvocab.draft_ids(trainer.model)
    if dmap is not None:
        draftvocab.save(final_tmp, dmap.tolist(), trainer.model.sd2_full_vocab)
    (final_tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in sd2_train.json
    engine = getattr(trainer, "deepspeed", None)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    epochs = result.metrics.get("epoch", 0.0) or 0.0
    runtime = result.metrics.get("train_runtime")
    write_json({
        "config": json.loads(cfg.model_dump_json()),
        "train_loss": result.training_loss, "global_step": trainer.state.global_step,
        "train_tokens": int(n_tokens * epochs),
        "train_runtime_s": runtime, "train_tokens_per_s": n_tokens * epochs / runtime if runtime else None,
        "world_size": trainer.args.world_size, "device": where.describe(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "examples": len(examples), "data": counts, "draft_vocab": len(dmap) if dmap is not None else None,
        "kd_teacher": ("stored" if trainer.stored_teacher else "live") if cfg.loss == "kd" else None,
        "feature_drafter": cfg.feature_drafter,
        "masked_layers": len(masks.masks),
        "mask_density": masks.density(), "regrown": regrown,
        "log_history": trainer.state.log_history,
    }, final_tmp / "sd2_train.json")
    _carry_lineage(cfg.init, final_tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(final_tmp, out)
    shutil.rmtree(work, ignore_errors=True)


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint whose files were all written (a run killed while saving leaves a partial one).
    HF writes trainer_state.json last; DeepSpeed keeps weights and optimizer in global_step*/."""
    ckpts = sorted(Path(ckpt_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for c in ckpts:
        deepspeed_state = any(c.glob("global_step*"))
        weights = deepspeed_state or any(c.glob("*.safetensors"))
        optimizer = deepspeed_state or (c / "optimizer.pt").exists()
        try:
            json.loads((c / "trainer_state.json").read_text())
            state_ok = True
        except (OSError, ValueError):
            state_ok = False
        if weights and optimizer and state_ok:
            return c
        log.warning("skipping incomplete checkpoint %s", c)
    return None


def _pruned_layers(init: str) -> set[str]:
    """Layer names listed in the init model's sparsity.json (written by `sd2 prune`)."""
    from sd2.models import resolve_spec

    src = Path(resolve_spec(init, allow_pickle=True)) / "sparsity.json"
    return set(json.loads(src.read_text()).get("layers", {})) if src.is_file() else set()


def _carry_lineage(init: str, out: Path) -> None:
    """Keep the init model's pruning/layer metadata, with sparsity re-measured on the trained weights."""
    from sd2.models import resolve_spec
    from sd2.prune.masks import sparsity_report_from_dir

    src = Path(resolve_spec(init, allow_pickle=True))
    if not src.is_dir():
        return
    if (src / "sd2_layers.json").exists():
        shutil.copy(src / "sd2_layers.json", out / "sd2_layers.json")
    if (src / "sparsity.json").exists():
        meta = json.loads((src / "sparsity.json").read_text())
        layer_filter = "|".join(re.escape(n) + "$" for n in meta.get("layers", {})) or r"(?!)"
        meta.update(sparsity_report_from_dir(out, layer_filter), fine_tuned_from=str(init))
        (out / "sparsity.json").write_text(json.dumps(meta, indent=2))


def _data_target(data: Path, why: str = "--loss kd") -> str:
    manifest = Path(data) / "sd2_manifest.json"
    if manifest.exists():
        t = json.loads(manifest.read_text()).get("target")
        if t:
            return t
    raise UserError(f"{why}: pass --kd-target (the data dir has no manifest naming its target)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[sd2 rank %(process)d] %(message)s")
    train_worker(TrainConfig.model_validate_json(Path(sys.argv[1]).read_text()),
                 progress=os.environ.get("RANK", "0") == "0")
