"""How quant.mixed's metrics read in report.md (the search trajectory, the per-layer table) and as a plot."""

from __future__ import annotations

from pathlib import Path


def mixed_markdown(m: dict) -> list[str]:
    """report.md section of quant.mixed's metrics: the search and the per-layer account of why each layer got its
    precision."""
    lo, hi = m["budget_points"]
    lines = [
        "",
        "## Mixed precision (quant.mixed)",
        "",
        f"Search metric {m['metric']}: float {m['base_score']:.3f}; budget drop in [{lo:g}, {hi:g}] points; "
        f"ordering {m['ordering']}; {m['verdict']} ({m['moves_applied']}/{m['moves_total']} moves, "
        f"{m['evaluations']} evaluations incl. the float model; traces {m['hessian_seconds']} s, "
        f"context {m['context_seconds']} s, search {m['search_seconds']} s). Layers: "
        + ", ".join(f"{k} {v}" for k, v in m["layers"].items())
        + ".",
    ]
    if m.get("next_moves_that_break_budget"):
        lines.append(
            f"Next moves in the ordering, which the budget stopped: {', '.join(m['next_moves_that_break_budget'])}."
        )
    lines += [
        "",
        "Bisection trajectory (every probe is the real ONNX model, scored in ORT):",
        "",
        "| probe | moves k | layers | score | drop | MB | inside budget |"
        + (" p50 ms |" if m["latency_timed"] else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if m["latency_timed"] else ""),
    ]
    timed = {t["k"]: t["p50_ms"] for t in m["latency_timed"]}
    for i, r in enumerate(m["trajectory"], 1):
        layers = ", ".join(f"{k} {v}" for k, v in r["layers"].items() if v)
        extra = f" {timed.get(r['k'], '')} |" if timed else ""
        lines.append(
            f"| {i} | {r['k']} | {layers} | {r['score']:.3f} | {r['drop']:+.3f} | {r['bytes'] / 1e6:.2f} | "
            f"{'yes' if r['feasible'] else 'no'} |{extra}"
        )
    dsts = [d for d in ("int8-dynamic", "int8-qdq", "int4-weights") if f"omega_{d}" in m["per_layer"][0]]
    head = "| layer | Hessian trace (± s.e.) | " + " | ".join(f"omega {d} | context {d} | score {d}" for d in dsts)
    alone = "drop_alone" in m["per_layer"][0]
    lines += [
        "",
        "Per layer (omega: HAWQ-V2 Tr(H)/n x ||Q(W)-W||^2; context: output change 1-cos when the layer takes "
        "the move with the others at their precision; score: augmented sensitivity per MB saved):",
        "",
        head + " | chosen | KB |" + (" drop alone |" if alone else ""),
        "|---|---|" + "---|---|---|" * len(dsts) + "---|---|" + ("---|" if alone else ""),
    ]
    for r in m["per_layer"]:
        cells = " | ".join(f"{r[f'omega_{d}']:.3g} | {r[f'context_{d}']:.3g} | {r[f'score_{d}']:.3g}" for d in dsts)
        lines.append(
            f"| {r['layer']} | {r['trace']:.4g} ± {r['trace_stderr']:.2g} | {cells} | {r['precision']} | "
            f"{r['bytes'] / 1e3:.1f} |" + (f" {r['drop_alone']:+.3f} |" if alone else "")
        )
    return lines


def plot_mixed(m: dict, folder: Path) -> None:
    """mixed_search.png: the bisection trajectory, drop and size per probe, with the budget band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = m["trajectory"]
    steps = list(range(1, len(traj) + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    ax.axhspan(*m["budget_points"], color="tab:green", alpha=0.15, label="budget (drop range)")
    ax.plot(steps, [r["drop"] for r in traj], "o-", color="tab:red", label="measured drop")
    for x, r in zip(steps, traj):
        ax.annotate(f"k={r['k']}", (x, r["drop"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xlabel("probe (bisection step)")
    ax.set_ylabel(f"drop of {m['metric'].split(' ')[0]} (points)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["bytes"] / 1e6 for r in traj], "s--", color="tab:blue", label="model MB")
    ax2.set_ylabel("model size (MB)")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    ax.set_title(
        f"quant.mixed search ({m['ordering']} ordering): {m['moves_applied']}/{m['moves_total']} moves", fontsize=10
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "mixed_search.png")
    plt.close(fig)
