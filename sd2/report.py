"""Human-readable views of results: summary tables for the terminal and markdown."""

from __future__ import annotations

from sd2.study import (  # the study's queries and tables live in their own module
    _SETTING, _at, _f, _gammas, _headline_mal, _m, category_table, claim_rows, drafter_table, gamma_table,
    sampling_table, study_runs,
)


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
        f"time ratio {_f(res.get('drafter_time_ratio'), 3)}   verify cost v {_f(res.get('verify_cost_ratio'))}   "
        f"predicted speedup {_f(res.get('predicted_speedup'))}x   "
        f"measured speedup {_f(res['speedup'])}x ({_f(res['spec_tokens_per_s'], 1)} vs "
        f"{_f(res['target_tokens_per_s'], 1)} tok/s)   lossless {res['lossless']}",
        "",
        f"{'category':<16}{'n':>4}{'MAL':>8}{'accept':>9}{'speedup':>9}",
    ]
    rows = [f"{cat:<16}{v['n_prompts']:>4}{_f(v['mal']):>8}{_f(v['acceptance_rate']):>9}{_f(v['speedup']):>9}"
            for cat, v in res["per_category"].items()]
    return "\n".join(head + rows)


def _cell(col: str, v) -> str:
    """One table cell for people: MACs in millions, booleans as true/false, run ids short, 3 decimals."""
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    if col == "lossless":
        return "true" if float(v) >= 0.5 else "false"
    if col == "run_id" or col == "parent":
        return str(v)[:8]
    if "macs" in col:
        return f"{float(v) / 1e6:.1f} M"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.3f}"
    return str(v)


def terminal_table(df) -> str:
    """A compare/demo table for the terminal (`49.0 M` MACs, `true`/`false`, short run ids)."""
    view = df.copy().astype(object)
    for col in view.columns:
        view[col] = [_cell(col, v) for v in df[col]]
    return view.to_string(index=False)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated by another (lower cost and higher value)."""
    front = []
    for i, (c, v) in enumerate(points):
        if not any((c2 <= c and v2 >= v) and (c2 < c or v2 > v) for j, (c2, v2) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot_results(df, out_dir) -> list:
    """PNG plots from a comparison DataFrame (one row per drafter): MAL vs sparsity per method/pattern, MAL vs
    drafter MACs with the Pareto front, and per-category MAL bars when the frame has mal.<category> columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    sp = df.dropna(subset=["prune.sparsity"]) if "prune.sparsity" in df else df.iloc[0:0]
    if len(sp):
        fig, ax = plt.subplots(figsize=(6, 4))
        for (method, pattern), g in sp.groupby(["prune.method", "prune.pattern"]):
            g = g.assign(s=g["prune.sparsity"].astype(float)).sort_values("s")
            ax.plot(g["s"], g["mal"].astype(float), marker="o", label=f"{method} {pattern}")
        dense = df[df.get("kind", "") == "dense"] if "kind" in df else df.iloc[0:0]
        for _, r in dense.iterrows():
            ax.axhline(float(r["mal"]), ls="--", c="gray", label=f"dense ({r['drafter']})")
        files.append(_finish(fig, ax, "sparsity", "MAL vs sparsity", out_dir / "mal_vs_sparsity.png"))
    pts = df.dropna(subset=["drafter_macs_per_token", "mal"])
    if len(pts):
        fig, ax = plt.subplots(figsize=(6, 4))
        xy = [(float(a), float(b)) for a, b in zip(pts["drafter_macs_per_token"], pts["mal"])]
        front = pareto_front(xy)
        ax.scatter([x / 1e6 for x, _ in xy], [y for _, y in xy], c="tab:blue")
        for (x, y), name in zip(xy, pts["drafter"]):
            ax.annotate(str(name), (x / 1e6, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        fx = sorted(xy[i] for i in front)
        ax.plot([x / 1e6 for x, _ in fx], [y for _, y in fx], c="tab:red", marker="s", label="Pareto front")
        files.append(_finish(fig, ax, "drafter MACs per token (M)", "MAL vs drafter MACs", out_dir / "mal_vs_macs.png"))
    cat_cols = [c for c in df.columns if c.startswith("mal.") and not _SETTING.fullmatch(c[4:])]
    if cat_cols:
        fig, ax = plt.subplots(figsize=(max(6, len(cat_cols) * 0.6), 4))
        width = 0.8 / max(len(df), 1)
        for k, (_, r) in enumerate(df.iterrows()):
            ax.bar([i + k * width for i in range(len(cat_cols))], [float(r[c]) for c in cat_cols], width,
                   label=str(r["drafter"]))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cat_cols))])
        ax.set_xticklabels([c[4:] for c in cat_cols], rotation=45, ha="right", fontsize=7)
        files.append(_finish(fig, ax, None, "MAL per category", out_dir / "mal_per_category.png"))
    return files


def _finish(fig, ax, xlabel, title, path):
    import matplotlib.pyplot as plt

    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("MAL")
    ax.set_title(title)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(df, columns: list[str] | None = None) -> str:
    cols = [c for c in columns if c in df.columns] if columns is not None else list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) and v == v and abs(v) < 1e5 else
                         (f"{v:.3g}" if isinstance(v, float) and v == v else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The study report (docs/results.md): tables and claim checks come from sd2.study (MLflow queries), plots here.


def study_plots(kids, out_dir, stem: str) -> list:
    """MAL vs sparsity, MAL vs MACs (Pareto) and MAL vs γ, as PNGs named <stem>-*.png."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from pathlib import Path

    out_dir = Path(out_dir)
    rows = []
    for _, r in kids.iterrows():
        m = _headline_mal(r)[0]
        sp = r.get("params.prune.sparsity")
        rows.append({"drafter": r["tags.sd2.drafter"], "kind": r.get("params.kind"), "mal": m,
                     "prune.method": r.get("params.prune.method"), "prune.pattern": r.get("params.prune.pattern"),
                     "prune.sparsity": float(sp) if sp not in (None, "") and sp == sp else None,
                     "drafter_macs_per_token": _m(r, "drafter_macs_per_token")})
    files = []
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # plot_results' file names, prefixed with the stem
        for f in plot_results(pd.DataFrame(rows), tmp):
            files.append(f.replace(out_dir / f"{stem}-{f.name}"))
    gs = _gammas(kids)
    if len(gs) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        for _, r in kids.iterrows():
            ys = [_at(r, "mal", g) for g in gs]
            if all(y is not None for y in ys):
                ax.plot(gs, ys, marker="o", label=r["tags.sd2.drafter"])
        ax.set_xticks(gs)
        files.append(_finish(fig, ax, "γ (draft tokens per verification)", "MAL vs γ (greedy)",
                             out_dir / f"{stem}-mal_vs_gamma.png"))
    return files


def _seeds(parent: dict) -> str:
    """The seed set a study distilled: its mix when one was given, else the profile's limit on the default seeds."""
    mix = parent.get("params.seed_prompts")
    if mix not in (None, "", "None"):
        return f"the seed mix `{mix}`"
    return f"{parent.get('params.distill_limit')} seed prompts"


def _survival(parent: dict) -> str:
    """How much of the target's output the distillation filter kept (logged on the parent run since it was)."""
    def n(key: str):
        v = parent.get(f"metrics.distill.{key}")
        return None if v is None or v != v else int(v)

    kept, seeds = n("kept"), n("seed_records")
    if kept is None or not seeds:
        return ""
    return (f" — {kept} of {seeds} answers kept ({kept / seeds:.0%}; {n('degenerate') or 0} dropped as repetition "
            f"loops, {n('empty') or 0} empty, {n('duplicate') or 0} duplicates; {n('truncated_kept') or 0} kept "
            f"cut at the token limit; {n('too_long_skipped') or 0} seeds with over-long prompts skipped)")


def _minutes(parent: dict) -> str:
    start, end = parent.get("start_time"), parent.get("end_time")
    if start is None or end is None:
        return "—"
    return f"{(end - start).total_seconds() / 60:.0f} min"


def write_results(configs: list[str], out: str, reading: str | list[str] | None = None, command: str = "") -> list:
    """docs/results.md (and its PNGs beside it) from the latest finished pipeline run of each config in MLflow;
    `reading`: markdown files appended in order (the reading, an earlier study's tables kept as they were)."""
    from datetime import datetime, timezone
    from pathlib import Path

    import yaml

    from sd2 import tracking
    from sd2.config import PipelineConfig
    from sd2.errors import UserError
    from sd2.io import atomic_write_text

    out = Path(out)
    names = []
    for c in configs:
        try:
            names.append(PipelineConfig.build(**(yaml.safe_load(Path(c).read_text()) or {})).name)
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"--config {c}: {str(exc).splitlines()[0]}") from None
    readings = [reading] if isinstance(reading, str) else list(reading or [])
    for r in readings:
        if not Path(r).is_file():
            raise UserError(f"--reading {r}: file not found")
    studies = [(name, *study_runs(name)) for name in names]
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# SD² at small scale: results", "",
             f"_Generated by `{command or 'sd2 report'}` from the MLflow runs at `{tracking.tracking_uri()}` on "
             f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Every number below is read from those runs._", "",
             "## Regenerate everything", "", "```bash",
             "bash infra/scripts/setup.sh   # creates .venv (also run by make test / make demo)"]
    for c in configs:
        lines.append(f".venv/bin/sd2 pipeline --config {c}")
    lines += [f".venv/bin/{command or 'sd2 report'}", "```", "",
              "| study | MLflow parent run | target | drafter base | wall time here | git |",
              "|---|---|---|---|---|---|"]
    for name, parent, kids in studies:
        lines.append(f"| {name} | `{parent['run_id']}` | {parent.get('params.target')} | "
                     f"{parent.get('params.drafter_base') or parent.get('params.target')} "
                     f"(layers {parent.get('params.drafter_layers')}) | {_minutes(parent)} | "
                     f"{(parent.get('tags.git_sha') or '')[:8]} |")
    claims = [row for name, _, kids in studies for row in claim_rows(kids, name)]
    lines += ["", "## The paper's claims, checked", "",
              "MAL is greedy at the study's γ (the replayed value over the larger prompt set where available); "
              "verdicts compare 95% bootstrap intervals over prompts.", ""]
    if claims:
        import pandas as pd

        lines.append(markdown_table(pd.DataFrame(claims), ["study", "claim", "paper", "here", "verdict"]))
    files = []
    for name, parent, kids in studies:
        stem = out.stem + "-" + name
        lines += ["", f"## {name}", "", f"target `{parent.get('params.target')}`, drafter from "
                  f"`{parent.get('params.drafter_base') or parent.get('params.target')}` "
                  f"(layers {parent.get('params.drafter_layers')}); self-distillation "
                  f"{parent.get('params.distill_mode')} on {_seeds(parent)} "
                  f"({parent.get('params.distill_max_new_tokens')} new tokens){_survival(parent)}; dense training "
                  f"{parent.get('params.train_steps')} steps, sparse fine-tuning "
                  f"{parent.get('params.sparse_ft_steps')} "
                  f"steps (batch {parent.get('params.train_batch_size')}, lr {parent.get('params.lr')}); eval on "
                  f"{parent.get('params.eval_limit')} Spec-Bench prompts (engine, with timings)"
                  + (f" and {parent.get('params.replay_limit')} prompts (replayed greedy γ)"
                     if parent.get("params.replay_limit") not in (None, "", "None") else "")
                  + f", {parent.get('params.eval_max_new_tokens')} new tokens each, {parent.get('params.threads')} "
                  "thread(s).", "", "### Drafters (greedy)", "",
                  markdown_table(drafter_table(kids)), "",
                  "### MAL by γ (greedy)", "", markdown_table(gamma_table(kids))]
        st = sampling_table(kids)
        if len(st):
            lines += ["", "### Sampling", "", markdown_table(st)]
        ct = category_table(kids)
        lines += ["", f"### MAL per Spec-Bench category (engine, γ={parent.get('params.gamma')})", "",
                  markdown_table(ct), ""]
        for f in study_plots(kids, out.parent, stem):
            files.append(f)
            lines.append(f"![{f.stem}]({f.name})")
    for r in readings:
        lines += ["", Path(r).read_text().rstrip()]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return [out, *files]

