"""Device check: every sd2 stage on the device it is given, in a few minutes, with no network and no download.

    python bench/gpu_check.py                 # the first GPU (bf16), or the CPU when none is visible
    python bench/gpu_check.py --device cpu    # the CI variant: tiny models only

1. Plumbing, on tiny random Llama models built here: distill → layer-prune → train → prune → eval on the
   device. Asserts placement (parameters on the device), dtype (bf16 weights saved on a GPU), the sparsity
   kept, and losslessness of speculative decoding within the numeric path.
2. Timing, on a random-weight ~1B target with a ~100M drafter (tiny ones with --device cpu): tokens/s of
   sd2's engine vs HF greedy and HF assisted generation on the same pair, and the self-draft (drafter =
   target, MAL = γ+1). Random drafters accept nothing: the self-draft shows what verification costs.

Needs torch, transformers, datasets (+ sd2's own light imports: pydantic, pandas, tqdm, safetensors).
Prefect, MLflow and DeepSpeed are not used; the script says which of them are missing and skips nothing else.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

CORPUS = ("the quick brown fox jumps over the lazy dog. a small drafter proposes and a large target verifies. "
          "numbers 0 1 2 3 4 5 6 7 8 9 and words that repeat. ") * 30
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        failures.append(what)


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                                          show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def llama(vocab: int, hidden: int, layers: int, inter: int, heads: int, kv: int, seed: int = 0, eos: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      eos_token_id=eos, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = eos
    m.generation_config.pad_token_id = eos
    return m


def weights_dtypes(model_dir: Path) -> set[str]:
    from safetensors import safe_open

    out = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            out |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return out


def plumbing(root: Path, device: str) -> None:
    """Every stage on `device` with tiny models."""
    from sd2.config import DistillConfig, EvalConfig, TrainConfig
    from sd2.device import resolve
    from sd2.distill import distill
    from sd2.evaluate import run_eval
    from sd2.models import load_model, save_model
    from sd2.prune import prune_to_dir
    from sd2.prune.layers import layer_prune_to_dir
    from sd2.train import train

    where = resolve(device, "auto")
    print(f"\n1. stages on {where.describe()} (tiny random Llama, 4 layers)")
    tok = tokenizer(300)
    target = root / "target"
    save_model(llama(len(tok), 64, 4, 128, 4, 2, seed=1, eos=tok.eos_token_id), tok, target)
    seeds = root / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": f"tell me about the fox number {i}"}) + "\n" for i in range(12)))
    prompts = root / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"question_id": i, "category": "a" if i % 2 else "b",
                                           "turns": [f"the lazy dog {i}"]}) + "\n" for i in range(4)))
    m, _ = load_model(str(target), placement=where)
    p = next(m.parameters())
    check(p.device.type == torch.device(where.device).type and p.dtype == where.torch_dtype,
          f"load_model places the target on {p.device} in {p.dtype}")
    del m

    t0 = time.perf_counter()
    data = distill(DistillConfig(target=str(target), prompts=str(seeds), out=root / "data", max_new_tokens=12,
                                 batch_size=4, device=device), progress=False)
    man = json.loads((data / "sd2_manifest.json").read_text())
    check(man["counts"]["kept"] > 0 and man["device"] == where.describe(),
          f"distill on {man['device']}: {man['counts']['kept']} examples ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    layer_prune_to_dir(str(target), root / "base", keep_layers="0,-1", device=device)
    check(weights_dtypes(root / "base") == {where.dtype.replace("bfloat16", "BF16").replace("float32", "F32")
                                            .replace("float16", "F16")},
          f"layer-prune saved {weights_dtypes(root / 'base')} ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    train(TrainConfig(init=str(root / "base"), data=data, out=root / "dense", max_steps=6, batch_size=4, seq_len=64,
                      lr=1e-3, device=device, save_steps=6), progress=False)
    info = json.loads((root / "dense" / "sd2_train.json").read_text())
    check(info["device"] == where.describe() and info["global_step"] == 6,
          f"train on {info['device']}: loss {info['train_loss']:.3f} ({time.perf_counter() - t0:.1f}s), "
          f"saved {weights_dtypes(root / 'dense')}")

    t0 = time.perf_counter()
    meta = prune_to_dir(str(root / "dense"), "sparsegpt", root / "sparse", sparsity=0.5, calib=data, calib_samples=4,
                        seq_len=48, device=device, progress=False)
    check(abs(meta["sparsity"] - 0.5) < 0.01 and meta["device"] == where.describe(),
          f"sparsegpt on {meta['device']} (layer by layer): sparsity {meta['sparsity']:.3f} "
          f"({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    res, _ = run_eval(EvalConfig(target=str(target), drafter=str(root / "sparse"), prompts=prompts, gamma=3,
                                 max_new_tokens=16, device=device), progress=False)
    check(res["lossless"] is True, f"eval on {res['numeric_path']}: lossless, MAL {res['mal']:.2f} "
                                   f"({time.perf_counter() - t0:.1f}s)")
    res, _ = run_eval(EvalConfig(target=str(target), drafter=str(target), prompts=prompts, gamma=3,
                                 max_new_tokens=16, device=device), progress=False)
    check(res["lossless"] is True and res["mal"] > 3.5, f"self-draft: MAL {res['mal']:.2f} (γ+1 = 4 expected)")


def timing(device: str, big: bool, max_new_tokens: int, repeats: int) -> None:
    """sd2's engine vs HF generate on the same random-weight pair, alternating, medians."""
    from sd2.device import resolve
    from sd2.specdec import SpecDecoder, hf_assisted_generate

    where = resolve(device, "auto")
    vocab = 32000
    if big:  # ≈1.1B target, ≈90M drafter
        tcfg, dcfg = (2048, 16, 5632, 32, 8), (768, 6, 2048, 12, 4)
    else:
        tcfg, dcfg = (256, 8, 512, 8, 4), (128, 2, 256, 4, 2)
    target = llama(vocab, *tcfg, seed=1).to(where.device, where.torch_dtype)
    drafter = llama(vocab, *dcfg, seed=2).to(where.device, where.torch_dtype)
    nt = sum(p.numel() for p in target.parameters()) / 1e6
    nd = sum(p.numel() for p in drafter.parameters()) / 1e6
    print(f"\n2. timing on {where.describe()}: target {nt:.0f}M params, drafter {nd:.0f}M (random weights), "
          f"{max_new_tokens} new tokens, γ=4, medians of {repeats}")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, vocab, (32,), generator=g).tolist()

    def hf_greedy():
        inp = torch.tensor([prompt], device=target.device)
        from sd2.device import synchronize

        synchronize(target.device)
        t0 = time.perf_counter()
        out = target.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                              max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
        synchronize(target.device)
        toks = out[0, len(prompt):].tolist()
        return len(toks), time.perf_counter() - t0, toks

    target.generation_config.eos_token_id = None  # fixed lengths for a fair tokens/s
    drafter.generation_config.eos_token_id = None
    base = SpecDecoder(target, None)
    spec = SpecDecoder(target, drafter, gamma=4)
    selfd = SpecDecoder(target, target, gamma=4)
    base.eos = spec.eos = selfd.eos = set()
    runs = {
        "sd2 target-only": lambda: _res(base.generate(prompt, max_new_tokens)),
        "HF generate greedy": hf_greedy,
        "sd2 spec (drafter)": lambda: _res(spec.generate(prompt, max_new_tokens)),
        "HF assisted (same pair)": lambda: _res(hf_assisted_generate(target, drafter, prompt, gamma=4,
                                                                     max_new_tokens=max_new_tokens)),
        "sd2 self-draft (MAL γ+1)": lambda: _res(selfd.generate(prompt, max_new_tokens)),
    }
    for fn in runs.values():  # warm-up (kernels, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    outs: dict[str, list] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            n, secs, toks = fn()
            times[name].append(n / secs)
            outs[name] = toks
    ref = times["sd2 target-only"]
    print(f"  {'run':28s} {'tokens/s':>10s} {'vs sd2 target-only':>20s}")
    for name, tps in times.items():
        med = statistics.median(tps)
        print(f"  {name:28s} {med:10.1f} {med / statistics.median(ref):19.2f}x")
    check(outs["sd2 target-only"] == outs["sd2 spec (drafter)"] == outs["sd2 self-draft (MAL γ+1)"]
          == outs["HF generate greedy"], "speculative outputs equal target-only and HF greedy (lossless)")
    sd2_spec = statistics.median(times["sd2 spec (drafter)"])
    hf_spec = statistics.median(times["HF assisted (same pair)"])
    print(f"  sd2 engine vs HF assisted generation, same pair and path: {sd2_spec / hf_spec:.2f}x")


def _res(r):
    return len(r.tokens), r.seconds, r.tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                    help="the ~1B/100M timing pair (default: on a GPU)")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    missing = [m for m in ("prefect", "mlflow", "deepspeed") if importlib.util.find_spec(m) is None]
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
    print("not installed (not needed here): " + (", ".join(missing) if missing else "none"))
    from transformers.utils import logging as hf_logging

    from sd2.device import resolve

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    where = resolve(args.device, "auto")
    big = where.is_cuda if args.big is None else args.big
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        plumbing(Path(tmp), args.device)
    timing(args.device, big, args.max_new_tokens or (128 if big else 32), args.repeats)
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} check(s) FAILED'} "
          f"in {time.perf_counter() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
