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

from sd2.config import TrainConfig
from sd2.data import encode_prompt, load_distilled
from sd2.errors import UserError
from sd2.io import write_json
from sd2.models import check_output_dir, load_model, same_tokenizer

log = logging.getLogger(__name__)
IGNORE = -100


# ---------------------------------------------------------------------------------------------- data


def build_examples(ds, tok, seq_len: int, packing: bool = False) -> tuple[list[dict], int]:
    """Tokenize (chat-templated prompt, response + EOS); labels only on the response. Returns (examples, dropped)."""
    eos = tok.eos_token_id
    examples, dropped = [], 0
    for row in ds:
        p = encode_prompt(tok, row["prompt"])
        r = tok.encode(row["response"], add_special_tokens=False) + ([eos] if eos is not None else [])
        if packing:  # whole examples are concatenated, then cut into seq_len blocks below
            examples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
            continue
        if len(p) >= seq_len - 1:
            dropped += 1
            continue
        ids = (p + r)[:seq_len]
        labels = ([IGNORE] * len(p) + r)[:seq_len]
        examples.append({"input_ids": ids, "labels": labels})
    if packing and examples:
        packed, cur_ids, cur_lab = [], [], []
        for ex in examples:
            cur_ids += ex["input_ids"]
            cur_lab += ex["labels"]
            while len(cur_ids) >= seq_len:
                packed.append({"input_ids": cur_ids[:seq_len], "labels": cur_lab[:seq_len]})
                cur_ids, cur_lab = cur_ids[seq_len:], cur_lab[seq_len:]
        if cur_ids:
            packed.append({"input_ids": cur_ids, "labels": cur_lab})
        examples = packed
    return examples, dropped


class Collator:
    """Right-pads a batch; padding gets label -100 and attention 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            labels[i, :n] = torch.tensor(b["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


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
    load_distilled(cfg.data)  # fail fast on a bad data dir, before any process starts
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


def _trainer_class():
    """HF Trainer with the KD loss when a teacher is attached (`teacher`, `kd_divergence` attributes)."""
    from transformers import Trainer

    class SD2Trainer(Trainer):
        teacher = None
        kd_divergence = "fkl"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            with torch.no_grad():
                t_logits = self.teacher.to(outputs.logits.device)(input_ids=inputs["input_ids"],
                                                                   attention_mask=inputs["attention_mask"]).logits
            loss = kd_loss(outputs.logits, t_logits, inputs["labels"], self.kd_divergence)
            return (loss, outputs) if return_outputs else loss
    return SD2Trainer


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
    model.train()
    examples, dropped = build_examples(load_distilled(cfg.data), tok, cfg.seq_len, cfg.packing)
    if not examples:
        raise UserError(f"--seq-len {cfg.seq_len}: shorter than every prompt ({dropped} dropped); raise it")
    if dropped:
        log.warning("%d example(s) dropped: prompt longer than --seq-len %d", dropped, cfg.seq_len)
    masks = SparsityMasks.from_model(model, _pruned_layers(cfg.init))
    keeper = None
    if masks:
        log.info("keeping sparsity masks on %d linear layers (density %.3f)", len(masks.masks), masks.density())
        masks.hook_gradients(model)
        keeper = MaskKeeper(masks)
    args = _training_args(cfg, where, work, progress)
    trainer = _trainer_class()(model=model, args=args, train_dataset=examples, data_collator=Collator(
        tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
        callbacks=[keeper.callback] if keeper else [])
    if cfg.loss == "kd":
        trainer.teacher, trainer.kd_divergence = _teacher(cfg, where, tok), cfg.kd_divergence
    if keeper:
        keeper.trainer = trainer
    resume_from = None
    if cfg.resume:
        last = last_complete_checkpoint(work / "checkpoints")
        resume_from = str(last) if last else None
        if resume_from:
            log.info("resuming from %s", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    _publish(cfg, where, trainer, tok, masks, result, examples, dropped, out, work)
    return out


def _publish(cfg: TrainConfig, where, trainer, tok, masks, result, examples, dropped: int, out: Path,
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
    (final_tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the config is in sd2_train.json
    engine = getattr(trainer, "deepspeed", None)
    n_tokens = sum(len(e["input_ids"]) for e in examples)
    epochs = result.metrics.get("epoch", 0.0) or 0.0
    runtime = result.metrics.get("train_runtime")
    write_json({
        "config": json.loads(cfg.model_dump_json()),
        "train_loss": result.training_loss, "global_step": trainer.state.global_step,
        "train_runtime_s": runtime, "train_tokens_per_s": n_tokens * epochs / runtime if runtime else None,
        "world_size": trainer.args.world_size, "device": where.describe(),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": engine.zero_optimization_stage() if engine is not None else None,
        "examples": len(examples), "dropped": dropped, "masked_layers": len(masks.masks),
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


def _data_target(data: Path) -> str:
    manifest = Path(data) / "sd2_manifest.json"
    if manifest.exists():
        t = json.loads(manifest.read_text()).get("target")
        if t:
            return t
    raise UserError("--loss kd: pass --kd-target (the data dir has no manifest naming its target)")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="[sd2 rank %(process)d] %(message)s")
    train_worker(TrainConfig.model_validate_json(Path(sys.argv[1]).read_text()),
                 progress=os.environ.get("RANK", "0") == "0")
