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
    cat_cols = [c for c in df.columns if c.startswith("mal.")]
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


def markdown_table(df, columns: list[str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:.3f}" if isinstance(v, float) and v == v and abs(v) < 1e5 else
                         (f"{v:.3g}" if isinstance(v, float) and v == v else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
