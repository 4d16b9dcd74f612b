"""Benchmark of the decoding engine, per numeric path, in one process (runs alternate; medians over repeats).

For each numeric path (`none` = HF modules fp32, `lean` = sd2's lean forward fp32, `lean-fp16` = lean forward
with fp16 weights, one call into sd2's C kernel per layer, the CPU default) and each drafter (the untuned derived
drafter, the self-draft = the target itself, any drafter dirs given), on the same Spec-Bench prompts:
  - target ms/token: sd2's engine target-only vs HF `generate` greedy on the same model and numeric path
    (for the lean paths the HF side runs the HF modules with the same weights: fp32, or fp16 through the same
    GEMM kernel);
  - the cost model: v (verify γ+1 tokens ÷ one-token forward), drafter_time_ratio vs the MACs ratio c;
  - MAL, predicted speedup MAL ÷ (γ·drafter_time_ratio + v), measured speedup (spec ÷ target-only tokens/s);
  - sd2 speculative tokens/s vs HF assisted generation (γ fixed, same pair, same path);
  - lossless: every speculative output equals target-only on the path.

    .venv/bin/python bench/specdec.py                                   # untuned + self-draft, 3 paths
    .venv/bin/python bench/specdec.py --drafter DIR --paths lean-fp16   # a trained drafter on the default path
    .venv/bin/python bench/specdec.py --drafter DIR --paths lean-fp16 --lookup 2   # + prompt lookup (and HF's)
    .venv/bin/python bench/specdec.py --target gemma-3-270m --drafter SMOLLM2_DIR --paths fp16-lean-drafter
        # a drafter with another tokenizer: sd2's UAG against HF's (generate with assistant_tokenizer)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from sd2 import metrics  # noqa: E402
from sd2.config import DEFAULT_TARGET, FP16_TARGET_PATHS, LOOKUP_MAX  # noqa: E402
from sd2.data import encode_prompt, load_prompts  # noqa: E402
from sd2.evaluate import apply_fast_path, measure_costs  # noqa: E402
from sd2.fastpath import pack_fp16  # noqa: E402
from sd2.models import load_model, same_tokenizer, save_model, sd2_home  # noqa: E402
from sd2.progress import bar as progress_bar  # noqa: E402
from sd2.prune.layers import keep_layers  # noqa: E402
from sd2.eagle import is_feature_drafter  # noqa: E402
from sd2.specdec import DecodeResult, SpecDecoder, hf_assisted_generate  # noqa: E402


def derived_drafter(target: str) -> str:
    d = sd2_home() / "drafters" / f"{target}-L0-8_29"
    if not (d / "config.json").exists():
        m, tok = load_model(target)
        save_model(keep_layers(m, list(range(9)) + [29]), tok, d, overwrite=True)
    return str(d)


class _FirstStep(BaseStreamer):
    """Clock of HF generate's first step (the streamer sees the prompt, then each step's new tokens)."""

    def __init__(self):
        self.t0, self.first, self.first_tokens, self.calls = time.perf_counter(), None, 0, 0

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # call 1 is the prompt
            self.first, self.first_tokens = time.perf_counter() - self.t0, int(value.numel())

    def end(self):
        pass


def hf_greedy(model, ids, n) -> DecodeResult:
    clock = _FirstStep()
    inp = torch.tensor([ids])
    out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=n, streamer=clock)
    return DecodeResult(tokens=out[0, len(ids):].tolist(), target_passes=out.shape[1] - len(ids),
                        seconds=time.perf_counter() - clock.t0, first_step_seconds=clock.first or 0.0,
                        first_step_tokens=clock.first_tokens)


def hf_prompt_lookup(model, ids, n, gamma: int, ngram: int) -> DecodeResult:
    """HF `generate(prompt_lookup_num_tokens=γ)`: HF's own prompt-lookup decoding, its target passes counted."""
    calls = [0]
    hook = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        t0 = time.perf_counter()
        inp = torch.tensor([ids])
        out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=n,
                             prompt_lookup_num_tokens=gamma, max_matching_ngram_size=ngram)
        secs = time.perf_counter() - t0
    finally:
        hook.remove()
    return DecodeResult(tokens=out[0, len(ids):].tolist(), target_passes=calls[0], seconds=secs)


def _pin(model, tok):
    """Generation config with no sampling and no max_length default, so HF's paths are comparable."""
    model.generation_config = GenerationConfig(eos_token_id=model.generation_config.eos_token_id,
                                               pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return model


def _runs(path: str, t, ds: dict, hf_t, hf_ds: dict, tok, dtoks: dict, args) -> dict:
    """Every decoder of one path, each a function of (target prompt ids, {drafter: its own prompt ids})."""
    n = args.max_new_tokens

    def sd2(drafter=None, name=None, **kw):
        dtok = dtoks.get(name)
        s = SpecDecoder(t, drafter, gamma=args.gamma, target_tokenizer=tok, drafter_tokenizer=dtok,
                        cross_tokenizer=dtok is not None, **kw)
        return lambda ids, dids: s.generate(ids, n, drafter_prompt=dids.get(name))

    def hf(name, **kw):  # HF assisted generation; Universal Assisted Generation when the tokenizers differ
        both = {"target_tokenizer": tok, "drafter_tokenizer": dtoks[name]} if dtoks.get(name) else {}
        return lambda ids, dids: hf_assisted_generate(hf_t, hf_ds[name], ids, gamma=args.gamma, max_new_tokens=n,
                                                      **both, **kw)

    runs = {"hf_greedy": lambda ids, dids: hf_greedy(hf_t, ids, n), "sd2_target_only": sd2()}
    if args.lookup:  # prompt lookup alone: sd2's against HF's
        runs["sd2_lookup_only"] = sd2(lookup=args.lookup)
        runs["hf_prompt_lookup"] = lambda ids, dids: hf_prompt_lookup(hf_t, ids, n, args.gamma, LOOKUP_MAX)
    for name, d in ds.items():
        if args.lookup and d is not t:  # the drafter behind prompt lookup (dynamic too when asked)
            runs[f"sd2_lookup[{name}]"] = sd2(d, name, draft_threshold=args.draft_threshold, lookup=args.lookup)
        runs[f"sd2_spec[{name}]"] = sd2(d, name)
        hf_ok = not is_feature_drafter(d)  # HF's assistant API cannot pass the target's features
        if hf_ok:
            runs[f"hf_assisted[{name}]"] = hf(name)
        if args.draft_threshold and d is not t:  # dynamic draft length: sd2's rule vs HF's own
            runs[f"sd2_dyn[{name}]"] = sd2(d, name, draft_threshold=args.draft_threshold)
            if hf_ok:
                runs[f"hf_dyn[{name}]"] = hf(name, confidence_threshold=args.draft_threshold)
    return runs


def bench_path(path: str, target, drafters: dict, tok, dtoks: dict, texts: list[str], args) -> dict:
    """Every measurement of one numeric path (`dtoks`: a drafter's own tokenizer where it differs: UAG)."""
    t = copy.deepcopy(target)
    ds = {name: (t if d is target else copy.deepcopy(d)) for name, d in drafters.items()}
    macs_t = metrics.macs_per_token(target)["macs_per_token"]
    c = {name: metrics.macs_per_token(d)["macs_per_token"] / macs_t for name, d in drafters.items()}
    # the HF side of the comparison: HF modules with the path's weights
    packed = path in FP16_TARGET_PATHS
    hf_t = pack_fp16(copy.deepcopy(target)) if packed else copy.deepcopy(target)
    hf_ds = {name: (hf_t if d is target else (pack_fp16(copy.deepcopy(d)) if packed else copy.deepcopy(d)))
             for name, d in drafters.items()}
    apply_fast_path(path, t, t)
    for name, d in ds.items():
        if d is not t:
            ds[name] = apply_fast_path(path, t, d)[1]
    prompts = [encode_prompt(tok, x) for x in texts]
    dprompts = [{name: encode_prompt(dt, x) for name, dt in dtoks.items()} for x in texts]
    runs = _runs(path, t, ds, hf_t, hf_ds, tok, dtoks, args)
    for fn in runs.values():  # warm-up
        fn(prompts[0], dprompts[0])
    tps: dict[str, list[float]] = {k: [] for k in runs}
    dec: dict[str, list[float]] = {k: [] for k in runs}  # after the first step (no prefill)
    last: dict[str, list[DecodeResult]] = {}
    for r in range(args.repeats):
        res: dict[str, list[DecodeResult]] = {k: [] for k in runs}
        order = list(runs) if r % 2 == 0 else list(reversed(runs))  # alternate against drift
        for ids, dids in progress_bar(list(zip(prompts, dprompts)), progress=True, unit="prompt",
                                      desc=f"{path}, repeat {r + 1} of {args.repeats}"):
            for k in order:
                res[k].append(runs[k](ids, dids))
        for k, rs in res.items():
            tps[k].append(sum(len(x.tokens) for x in rs) / sum(x.seconds for x in rs))
            dec[k].append(sum(len(x.tokens) - x.first_step_tokens for x in rs)
                          / sum(x.seconds - x.first_step_seconds for x in rs))
        last = res
    med = {k: statistics.median(v) for k, v in tps.items()}
    dmed = {k: statistics.median(v) for k, v in dec.items()}
    ref = [x.tokens for x in last["sd2_target_only"]]
    out = {"path": path, "target_ms_per_token_sd2": 1e3 / med["sd2_target_only"],
           "target_ms_per_token_hf_greedy": 1e3 / med["hf_greedy"],
           "sd2_target_only_vs_hf_greedy": med["sd2_target_only"] / med["hf_greedy"],
           "decode_ms_per_token_sd2": 1e3 / dmed["sd2_target_only"],
           "decode_ms_per_token_hf_greedy": 1e3 / dmed["hf_greedy"],
           "decode_sd2_vs_hf_greedy": dmed["sd2_target_only"] / dmed["hf_greedy"], "drafters": {}}
    if args.lookup:
        out["lookup"] = {"min_ngram": args.lookup, "mal_sd2": metrics.mal(last["sd2_lookup_only"]),
                         "mal_hf": metrics.mal(last["hf_prompt_lookup"]),
                         "speedup_sd2": med["sd2_lookup_only"] / med["sd2_target_only"],
                         "speedup_hf_vs_hf_greedy": med["hf_prompt_lookup"] / med["hf_greedy"],
                         "sd2_vs_hf": med["sd2_lookup_only"] / med["hf_prompt_lookup"],
                         "lossless": [x.tokens for x in last["sd2_lookup_only"]] == ref}
    for name in drafters:
        cost = measure_costs(t, ds[name], dprompts[0].get(name, prompts[0]), prompts[0], args.gamma, repeats=9)
        mal = metrics.mal(last[f"sd2_spec[{name}]"])
        spec = med[f"sd2_spec[{name}]"]
        out["drafters"][name] = {
            "mal": mal, "mal_hf_assisted": _or_none(lambda: metrics.mal(last[f"hf_assisted[{name}]"])),
            "cost_ratio_macs": c[name],
            "drafter_time_ratio": cost["drafter_time_ratio"], "verify_cost_ratio": cost["verify_cost_ratio"],
            "time_over_macs": cost["drafter_time_ratio"] / c[name],
            "theoretical_speedup": metrics.theoretical_speedup(mal, args.gamma, c[name]),
            "predicted_speedup": metrics.predicted_speedup(mal, args.gamma, cost["drafter_time_ratio"],
                                                           cost["verify_cost_ratio"]),
            "measured_speedup": spec / med["sd2_target_only"],
            "measured_decode_speedup": dmed[f"sd2_spec[{name}]"] / dmed["sd2_target_only"],
            "sd2_vs_hf_assisted": _or_none(lambda: spec / med[f"hf_assisted[{name}]"]),
            "lossless": [x.tokens for x in last[f"sd2_spec[{name}]"]] == ref}
        if f"sd2_dyn[{name}]" in med:
            out["drafters"][name]["dynamic"] = {
                "threshold": args.draft_threshold, "mal_sd2": metrics.mal(last[f"sd2_dyn[{name}]"]),
                "mal_hf": _or_none(lambda: metrics.mal(last[f"hf_dyn[{name}]"])),
                "speedup_sd2": med[f"sd2_dyn[{name}]"] / med["sd2_target_only"],
                "speedup_hf_vs_hf_greedy": _or_none(lambda: med[f"hf_dyn[{name}]"] / med["hf_greedy"]),
                "sd2_vs_hf": _or_none(lambda: med[f"sd2_dyn[{name}]"] / med[f"hf_dyn[{name}]"]),
                "lossless": [x.tokens for x in last[f"sd2_dyn[{name}]"]] == ref}
        if f"sd2_lookup[{name}]" in med:
            rs = last[f"sd2_lookup[{name}]"]
            out["drafters"][name]["lookup"] = {
                "min_ngram": args.lookup, "threshold": args.draft_threshold, "mal": metrics.mal(rs),
                "step_share": sum(x.looked_up for x in rs) / max(sum(len(x.steps) for x in rs), 1),
                "speedup": med[f"sd2_lookup[{name}]"] / med["sd2_target_only"],
                "lossless": [x.tokens for x in rs] == ref}
    out["tokens_per_s_median"] = med
    return out


def _or_none(fn):
    """A comparison with HF assisted generation, or None where HF cannot run the drafter (feature drafters)."""
    try:
        return fn()
    except KeyError:
        return None


def _x(v, fmt: str = ".2f") -> str:
    return "–" if v is None else f"{v:{fmt}}×"


def table(report: dict) -> str:
    lines = ["| path | drafter | v | target ms/token sd2 / HF (decode only) | drafter time ratio (c) | MAL | "
             "predicted | measured (decode only) | sd2 ÷ HF assisted | lossless |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report["paths"]:
        for name, d in p["drafters"].items():
            lines.append(f"| {p['path']} | {name} | {d['verify_cost_ratio']:.2f} | {p['target_ms_per_token_sd2']:.1f}"
                         f" / {p['target_ms_per_token_hf_greedy']:.1f} ({p['decode_ms_per_token_sd2']:.1f} / "
                         f"{p['decode_ms_per_token_hf_greedy']:.1f}) | {d['drafter_time_ratio']:.3f} "
                         f"({d['cost_ratio_macs']:.3f}) | {d['mal']:.2f} | {d['predicted_speedup']:.2f}× | "
                         f"{d['measured_speedup']:.2f}× ({d['measured_decode_speedup']:.2f}×) | "
                         f"{_x(d['sd2_vs_hf_assisted'])} | {d['lossless']} |")
    dyn = [(p["path"], name, d["dynamic"]) for p in report["paths"] for name, d in p["drafters"].items()
           if "dynamic" in d]
    if dyn:
        lines += ["", "| path | drafter | threshold | MAL sd2 / HF | sd2 speedup vs sd2 target-only | "
                  "HF dynamic vs HF greedy | sd2 ÷ HF (dynamic) | lossless |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {path} | {name} | {x['threshold']} | {x['mal_sd2']:.2f} / "
                  f"{'–' if x['mal_hf'] is None else format(x['mal_hf'], '.2f')} | "
                  f"{x['speedup_sd2']:.2f}× | {_x(x['speedup_hf_vs_hf_greedy'])} | {_x(x['sd2_vs_hf'])} | "
                  f"{x['lossless']} |" for path, name, x in dyn]
    look = [(p["path"], name, d["lookup"]) for p in report["paths"] for name, d in p["drafters"].items()
            if "lookup" in d]
    if look:
        lines += ["", "| path | drafter + prompt lookup | threshold | MAL | steps copied | "
                  "speedup vs sd2 target-only | lossless |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {path} | {name} | {x['threshold'] or '–'} | {x['mal']:.2f} | {x['step_share']:.2f} | "
                  f"{x['speedup']:.2f}× | {x['lossless']} |" for path, name, x in look]
    alone = [(p["path"], p["lookup"]) for p in report["paths"] if "lookup" in p]
    if alone:
        lines += ["", "| path | prompt lookup alone | MAL sd2 / HF | sd2 speedup vs sd2 target-only | "
                  "HF vs HF greedy | sd2 ÷ HF | lossless |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {path} | n ≥ {x['min_ngram']} | {x['mal_sd2']:.2f} / {x['mal_hf']:.2f} | "
                  f"{x['speedup_sd2']:.2f}× | {x['speedup_hf_vs_hf_greedy']:.2f}× | {x['sd2_vs_hf']:.2f}× | "
                  f"{x['lossless']} |" for path, x in alone]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=DEFAULT_TARGET)
    ap.add_argument("--drafter", action="append", default=[], help="drafter dir (repeatable); default: untuned")
    ap.add_argument("--no-self-draft", action="store_true", help="skip drafter = target")
    ap.add_argument("--paths", default="none,lean,lean-fp16", help="comma-separated numeric paths")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-threshold", type=float, default=None,
                    help="also dynamic draft length at this top-1 probability: sd2's rule vs HF assisted "
                    "generation's assistant_confidence_threshold (same pair, same path)")
    ap.add_argument("--lookup", type=int, default=0,
                    help="also prompt lookup (shortest n-gram): alone (against HF's prompt_lookup_num_tokens) and in "
                    "front of each drafter (with --draft-threshold when given)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    target, tok = load_model(args.target)
    _pin(target, tok)
    drafters, dtoks = {}, {}
    for spec in args.drafter or [derived_drafter(args.target)]:
        name = Path(spec).name if not args.drafter else spec
        model, dtok = load_model(spec)
        drafters[name] = _pin(model, dtok)
        if not same_tokenizer(tok, dtok):  # another tokenizer: Universal Assisted Generation on both sides
            dtoks[name] = dtok
    if not args.no_self_draft:
        drafters["self-draft"] = target
    texts = [p.text for p in load_prompts(None, limit=args.limit)]
    report = {"target": args.target, "gamma": args.gamma, "threads": args.threads, "prompts": len(texts),
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "torch": torch.__version__,
              "other_tokenizer": sorted(dtoks),
              "paths": [bench_path(p, target, drafters, tok, dtoks, texts, args) for p in args.paths.split(",")]}
    print(json.dumps(report, indent=2))
    print()
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
