"""The SD² study read back from MLflow: the latest finished run of each study pipeline, its drafter runs, the
tables built from them and the paper's claims checked against 95% CIs. Never typed in: every number comes from
the runs (`sd2 report` renders them, sd2.report)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

_SETTING = re.compile(r"g\d+|t[\d.]+")  # metric suffixes of more γ / sampling runs, not categories


def _f(x, nd=2) -> str:
    return "—" if x is None or x != x else f"{x:.{nd}f}"


PAPER_CLAIMS = {"mal_vs_layer": 1.59, "macs_saved": 0.4387, "mal_lost": 0.0836}


def study_runs(parent_name: str) -> tuple[dict, "pd.DataFrame"]:
    """The latest finished pipeline run named `parent_name` (any sd2/* experiment) and its drafter runs."""
    from sd2 import tracking
    from sd2.errors import UserError

    mlflow, _ = tracking.client()
    names = [e.name for e in mlflow.search_experiments() if e.name.startswith("sd2/")]
    if not names:
        raise UserError(f"--parent {parent_name}: no sd2 experiments at {tracking.tracking_uri()}; run the study "
                        "pipelines first (or set MLFLOW_TRACKING_URI)")
    parents = mlflow.search_runs(experiment_names=names, filter_string=(
        f"attributes.run_name = '{parent_name}' and tags.`sd2.kind` = 'pipeline' and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    if parents.empty:
        raise UserError(f"--parent {parent_name}: no finished pipeline run with that name at "
                        f"{tracking.tracking_uri()}; run `sd2 pipeline --config ...` first")
    parent = parents.iloc[0].to_dict()
    kids = mlflow.search_runs(experiment_ids=[parent["experiment_id"]], filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent['run_id']}' and tags.`sd2.kind` = 'drafter'"),
        order_by=["attributes.start_time ASC"], max_results=500)
    return parent, kids


def _m(r, key):
    v = r.get(f"metrics.{key}")
    return None if v is None or v != v else float(v)


def _ci(r, label: str = "") -> str:
    lo, hi = _m(r, f"mal_ci95_lo{label}"), _m(r, f"mal_ci95_hi{label}")
    return "—" if lo is None else f"{lo:.2f}–{hi:.2f}"


def _headline_mal(r) -> tuple[float | None, float | None, float | None, str]:
    """(MAL, lo, hi, source) at the study's γ: the replay over more prompts when there, else the engine."""
    g = int(float(r.get("params.gamma", 4) or 4))
    source = "replay" if _m(r, f"mal.g{g}") is not None else "engine"
    return _at(r, "mal", g), _at(r, "mal_ci95_lo", g), _at(r, "mal_ci95_hi", g), source


def _verdict(better: tuple, worse: tuple) -> str:
    """'holds' when the first MAL's CI lies above the second's, 'direction only' when only the point estimate
    does, else 'does not hold'."""
    (m1, lo1, _), (m2, _, hi2) = better, worse
    if m1 is None or m2 is None:
        return "not measured"
    if lo1 is not None and hi2 is not None and lo1 > hi2:
        return "holds (95% CIs disjoint)"
    return "direction only (CIs overlap)" if m1 > m2 else "does not hold"


def claim_rows(kids, study: str) -> list[dict]:
    """The paper's claims, each checked on one study's drafter runs."""
    by = {r["tags.sd2.drafter"]: r for _, r in kids.iterrows()}
    mal = {n: _headline_mal(r)[:3] for n, r in by.items()}
    rows = []
    if "dense-self-distilled" in by and "derived-untuned" in by:
        d, u = mal["dense-self-distilled"], mal["derived-untuned"]
        rows.append({"study": study, "claim": "self-data distillation raises MAL (vs the untuned drafter)",
                     "paper": "yes", "here": f"MAL {d[0]:.3f} vs {u[0]:.3f}", "verdict": _verdict(d, u)})
    if "dense-self-distilled" in by and "dense-plain-sft" in by:
        d, f = mal["dense-self-distilled"], mal["dense-plain-sft"]
        rows.append({"study": study, "claim": "self-distilled data beats the seed answers (plain SFT)",
                     "paper": "yes", "here": f"MAL {d[0]:.3f} vs {f[0]:.3f}", "verdict": _verdict(d, f)})
    for n, r in by.items():
        ref = r.get("params.matched_to")
        if r.get("params.kind") == "layer-pruned" and ref in by:
            s, lp = mal[ref], mal[n]
            ratio = s[0] / lp[0] if s[0] and lp[0] else float("nan")
            gain = (s[0] - 1) / (lp[0] - 1) if lp[0] and lp[0] > 1 else float("nan")
            rows.append({"study": study, "claim": f"fine-grained sparsity beats layer pruning at equal MACs ({ref} "
                         f"vs {n})", "paper": f"{PAPER_CLAIMS['mal_vs_layer']:.2f}× MAL",
                         "here": f"{ratio:.3f}× MAL, {gain:.2f}× MAL − 1 ({s[0]:.3f} vs {lp[0]:.3f}; MACs "
                         f"{_m(by[ref], 'drafter_macs_per_token') / 1e6:.1f}M vs "
                         f"{_m(r, 'drafter_macs_per_token') / 1e6:.1f}M)", "verdict": _verdict(s, lp)})
    rows += _macs_claim(by, mal, study)
    return rows


def _macs_claim(by: dict, mal: dict, study: str) -> list[dict]:
    """SD²'s "43.87% fewer MACs for 8.36% less MAL" against the dense drafter; where a study has none (its deep
    drafter is the target itself, whose MAL is γ+1 by construction), against its least compressed sparse drafter."""
    sparse = [(n, r) for n, r in by.items() if r.get("params.kind") == "sparse"]
    ref = "dense-self-distilled" if "dense-self-distilled" in by else None
    if ref is None and len(sparse) > 1:
        ref = max(sparse, key=lambda x: (x[1].get("params.prune.pattern") == "unstructured",
                                         _m(x[1], "drafter_macs_per_token")))[0]
        sparse = [x for x in sparse if x[0] != ref]
    rows = []
    dense = by.get(ref) if ref else None
    if dense is not None:
        dm, dmacs = mal[ref][0], _m(dense, "drafter_macs_per_token")
        if sparse and dm:
            # the sparse drafter whose MACs saving is nearest the paper's 43.87%
            n, r = min(sparse, key=lambda x: abs(1 - _m(x[1], "drafter_macs_per_token") / dmacs
                                                  - PAPER_CLAIMS["macs_saved"]))
            saved = 1 - _m(r, "drafter_macs_per_token") / dmacs
            lost = 1 - mal[n][0] / dm
            # Near MAL = 1 a relative MAL loss looks small whatever happens: the accepted tokens per pass
            # (MAL − 1) are what the drafter adds, so their loss is reported too.
            gain_lost = 1 - (mal[n][0] - 1) / (dm - 1) if dm > 1 else float("nan")
            ok = lost <= PAPER_CLAIMS["mal_lost"] + 1e-9
            vs = "dense" if ref == "dense-self-distilled" else f"the least compressed drafter, {ref}"
            rows.append({"study": study, "claim": f"large MACs saving for a small MAL loss vs {vs} ({n})",
                         "paper": f"{PAPER_CLAIMS['macs_saved']:.2%} fewer MACs, "
                                  f"{PAPER_CLAIMS['mal_lost']:.2%} less MAL",
                         "here": f"{saved:.2%} fewer MACs, {lost:.2%} less MAL ({gain_lost:.0%} less MAL − 1)",
                         "verdict": ("holds" if gain_lost <= PAPER_CLAIMS["mal_lost"] else
                                     "holds on MAL, not on MAL − 1") if ok else
                         ("partly (more MAL lost)" if lost < saved else "does not hold")})
    return rows


def drafter_table(kids) -> "pd.DataFrame":
    """One row per drafter: what it is, what it costs, how well it drafts (γ of the study, greedy)."""
    import pandas as pd

    rows, srcs = [], set()
    for _, r in kids.iterrows():
        m, lo, hi, src = _headline_mal(r)
        srcs.add(src)
        g = int(float(r.get("params.gamma", 4) or 4))
        sp = r.get("params.prune.sparsity")
        rows.append({
            "drafter": r["tags.sd2.drafter"], "kind": r.get("params.kind"),
            "sparsity": "—" if sp in (None, "") or sp != sp else f"{float(sp):.0%} {r.get('params.prune.pattern')}",
            "MACs/token (M)": round(_m(r, "drafter_macs_per_token") / 1e6, 1),
            "c": round(_m(r, "cost_ratio"), 3),
            f"MAL γ={g} ({src})": f"{m:.3f} [{lo:.2f}–{hi:.2f}]" if lo is not None else f"{m:.3f}",
            "MAL engine": f"{_m(r, 'mal'):.3f} [{_ci(r)}]",
            "acceptance": round(_m(r, f"acceptance_rate.g{g}") or _m(r, "acceptance_rate"), 3),
            "theoretical speedup": round(_m(r, f"theoretical_speedup.g{g}") or _m(r, "theoretical_speedup"), 3),
            # what this CPU feels: weight bytes read per token (dense kernels) and forward time, each ÷ the target's
            "bytes ratio": _f(_m(r, "weight_bytes_ratio"), 3),
            "time ratio": _f(_m(r, "drafter_time_ratio"), 3),
            "predicted speedup": _f(_m(r, "predicted_speedup"), 3),
            "measured speedup": round(_m(r, "speedup"), 3),
            "lossless": bool(_m(r, "lossless")) if _m(r, "lossless") is not None else None,
        })
    df = pd.DataFrame(rows)
    # without a replay (cross-tokenizer studies) the headline MAL is the engine's: no second column repeating it
    return df.drop(columns="MAL engine") if srcs == {"engine"} else df


def _settings(kids, prefix: str) -> list[str]:
    labs = {c.split(".", 2)[2] for c in kids.columns if c.startswith(f"metrics.mal.{prefix}")}
    labs = {lab for lab in labs if _SETTING.fullmatch(lab)}  # not categories such as "translation"
    return sorted(labs, key=lambda x: float(x[1:]))


def _gammas(kids) -> list[int]:
    """Every γ a study measured: its main γ and those of the replay or extra engine runs."""
    main = {int(float(g)) for g in kids.get("params.gamma", []) if g == g and g not in (None, "")}
    return sorted(main | {int(lab[1:]) for lab in _settings(kids, "g")})


def _at(r, key: str, g: int):
    """A metric at γ=g: the per-γ value (replay or extra run), else the main run's when g is the main γ."""
    v = _m(r, f"{key}.g{g}")
    if v is None and g == int(float(r.get("params.gamma", 4) or 4)):
        v = _m(r, key)
    return v


def gamma_table(kids) -> "pd.DataFrame":
    """MAL (95% CI), theoretical and (where run by the engine) measured speedup at each evaluated γ."""
    import pandas as pd

    rows = []
    for _, r in kids.iterrows():
        row = {"drafter": r["tags.sd2.drafter"]}
        for g in _gammas(kids):
            m, lo, hi = _at(r, "mal", g), _at(r, "mal_ci95_lo", g), _at(r, "mal_ci95_hi", g)
            row[f"MAL γ={g}"] = "—" if m is None else f"{m:.3f} [{lo:.2f}–{hi:.2f}]" if lo is not None else f"{m:.3f}"
            t = _at(r, "theoretical_speedup", g)
            row[f"theor. γ={g}"] = "—" if t is None else f"{t:.3f}"
            sp = _at(r, "speedup", g)
            row[f"measured γ={g}"] = "—" if sp is None else f"{sp:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def sampling_table(kids) -> "pd.DataFrame":
    import pandas as pd

    rows = []
    for lab in _settings(kids, "t"):
        for _, r in kids.iterrows():
            if _m(r, f"mal.{lab}") is None:
                continue
            rows.append({"drafter": r["tags.sd2.drafter"], "temperature": float(lab[1:]),
                         "MAL": f"{_m(r, f'mal.{lab}'):.3f} [{_ci(r, '.' + lab)}]",
                         "acceptance": round(_m(r, f"acceptance_rate.{lab}"), 3),
                         "theoretical speedup": round(_m(r, f"theoretical_speedup.{lab}"), 3),
                         "measured speedup": round(_m(r, f"speedup.{lab}"), 3)})
    return pd.DataFrame(rows)


def category_table(kids) -> "pd.DataFrame":
    """Engine MAL per Spec-Bench category at the study's γ."""
    import pandas as pd

    cats = sorted(c[len("metrics.mal."):] for c in kids.columns if c.startswith("metrics.mal.")
                  and not _SETTING.fullmatch(c[len("metrics.mal."):]))
    rows = [{"drafter": r["tags.sd2.drafter"], **{c: _m(r, f"mal.{c}") for c in cats}} for _, r in kids.iterrows()]
    return pd.DataFrame(rows)
