"""Human-readable views of results: summary tables for the terminal and markdown."""

from __future__ import annotations


def _f(x, nd=2) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


def eval_table(res: dict) -> str:
    """A plain-text table of one `sd2 eval` result: headline metrics, then one row per category."""
    lo, hi = res["mal_ci95"]
    head = [
        f"target  {res['target']}",
        f"drafter {res['drafter']}",
        f"γ={res['gamma']}  temperature={res['temperature']}  max_new_tokens={res['max_new_tokens']}  "
        f"prompts={res['n_prompts']}",
        f"MAL {_f(res['mal'])} [95% CI {_f(lo)}–{_f(hi)}]   acceptance {_f(res['acceptance_rate'])}   "
        f"per position {' '.join(_f(a) for a in res['per_position_acceptance'])}",
        f"cost ratio c {_f(res['cost_ratio'], 3)}   theoretical speedup {_f(res['theoretical_speedup'])}x   "
        f"measured speedup {_f(res['speedup'])}x ({_f(res['spec_tokens_per_s'], 1)} vs "
        f"{_f(res['target_tokens_per_s'], 1)} tok/s)   lossless {res['lossless']}",
        "",
        f"{'category':<16}{'n':>4}{'MAL':>8}{'accept':>9}{'speedup':>9}",
    ]
    rows = [f"{cat:<16}{v['n_prompts']:>4}{_f(v['mal']):>8}{_f(v['acceptance_rate']):>9}{_f(v['speedup']):>9}"
            for cat, v in res["per_category"].items()]
    return "\n".join(head + rows)
