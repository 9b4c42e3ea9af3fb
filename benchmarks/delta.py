"""Delta-parameter pruning on MiniLM fine-tuned on STS-B: DARE, DAREx-q, magnitude, importance, STS-B dev.

    python benchmarks/delta.py [--ps 0.5,0.9,0.99] [--seeds 0,1,2] [--max-steps 240] [--threads 1]
    python benchmarks/delta.py --lr 2e-4 --ps 0.99 --methods dare,darex-q --name delta-large-lr2e-4  # larger deltas
    python benchmarks/delta.py --lr 5e-4 --ps 0.99 --methods dare,darex-q,magnitude --val-pairs 150 --name delta-large

1. Fine-tunes the packaged MiniLM (`minilm`) on ../shared/data/stsb/sts-train.csv: cosine-similarity
   regression (predict cos(u, v), target score / 5, MSE), batch 16, AdamW lr 2e-5 (10 % warm-up, linear
   decay, no weight decay), seeded, 240 steps (2/3 of an epoch: ~5-6 minutes on one busy core; --max-steps 0
   runs the full --epochs); a safety stop at --max-train-minutes is recorded if it fires.
2. For every p and method, prunes the fine-tuning delta with the `prune.delta` stage `compress run` uses
   (base `minilm`), random methods over every seed (magnitude and importance are deterministic: once), and
   scores STS-B dev Spearman x100 in torch (compress.core.evaluate.stsb_spearman on compress.core.models.torch_outputs).
3. Checks that `rebuild_from_delta(minilm, delta.safetensors)` rebuilds the pruned model exactly (p = max, DAREx-q).
Writes benchmarks/results/NAME.{json,md} (--name, default delta) and prints the table; refuses to overwrite
them without --force. About 20 minutes on 2 busy cores (1 thread).

Larger deltas: a higher --lr (and/or more --max-steps) moves the fine-tuned weights further from the base, which
is where DARE's 1/(1-p) rescale is expected to break at p -> 0.99 and DAREx-q's 1/q to matter. --val-pairs N
holds N STS-B train pairs out of fine-tuning (seeded) and adds DAREx-q with q chosen on them (q_search = "grid",
eval_file = those pairs), so q is never chosen on the dev set the table scores.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from compress.cli import _quiet_libraries

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"
RESULTS = Path(__file__).parent / "results"
LABELS = {
    "dare": "DARE",
    "darex-q": "DAREx-q (unlabelled q)",
    "darex-q-grid": "DAREx-q (q on held-out train)",
    "magnitude": "magnitude",
    "importance": "importance",
}
RANDOM = ("dare", "darex-q", "darex-q-grid")  # random masks: one run per seed


def split_validation(train, n: int, seed: int = 1234):
    """(train without n seeded held-out pairs, those n pairs); n = 0: (train, None)."""
    from compress.core.data import PairSet

    if n <= 0:
        return train, None
    order = list(range(len(train.scores)))
    random.Random(seed).shuffle(order)
    pick = lambda ids: PairSet(
        [train.first[i] for i in ids], [train.second[i] for i in ids], [train.scores[i] for i in ids]
    )
    return pick(sorted(order[n:])), pick(sorted(order[:n]))


def write_stsb(pairs, path: Path) -> None:
    """STS-B TSV (genre, file, year, id, score, s1, s2), what compress.core.data.read_stsb reads."""
    path.write_text(
        "".join(
            f"val\tval\tval\t{i:04d}\t{s:.3f}\t{a}\t{b}\n"
            for i, (a, b, s) in enumerate(zip(pairs.first, pairs.second, pairs.scores))
        ),
        encoding="utf-8",
    )


def fine_tune(lm, train, epochs: int, batch: int, lr: float, max_steps: int, max_minutes: float, seed: int) -> dict:
    """Cosine-similarity regression on STS-B train, in place; returns what was done.

    The step count is fixed (epochs, capped at max_steps) so the fine-tuned model does not depend on host speed;
    max_minutes is only a safety stop, recorded as ``early_stop`` when it fires."""
    import torch

    torch.manual_seed(seed)
    order = list(range(len(train.scores)))
    random.Random(seed).shuffle(order)
    steps_per_epoch = math.ceil(len(order) / batch)
    total = min(steps_per_epoch * epochs, max_steps) if max_steps > 0 else steps_per_epoch * epochs
    warmup = max(1, total // 10)
    model = lm.model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
    )
    model.train()
    t0, step, losses, stopped = time.perf_counter(), 0, [], None
    for _epoch in range(epochs):
        for i in range(0, len(order), batch):
            if step == total:
                break
            ids = order[i : i + batch]
            u = model(model.preprocess([train.first[j] for j in ids]))["sentence_embedding"]  # (B, H)
            v = model(model.preprocess([train.second[j] for j in ids]))["sentence_embedding"]
            cos = torch.nn.functional.cosine_similarity(u, v)  # (B,)
            loss = torch.nn.functional.mse_loss(cos, torch.tensor([train.scores[j] / 5 for j in ids]))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            losses.append(loss.item())
            elapsed = time.perf_counter() - t0
            if step % 25 == 0 or step == total:
                eta = elapsed / step * (total - step)
                print(
                    f"  train step {step}/{total}  loss {sum(losses[-25:]) / len(losses[-25:]):.4f}  "
                    f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left",
                    flush=True,
                )
            if elapsed / step * (step + 1) > max_minutes * 60 and step < total:
                stopped = f"stopped after {step}/{total} steps to stay under {max_minutes} minutes"
                print(f"  {stopped}", flush=True)
                break
        if stopped:
            break
    model.eval()
    return {
        "epochs": epochs,
        "train_pairs": len(order),
        "batch": batch,
        "lr": lr,
        "steps": step,
        "planned_steps": total,
        "seconds": round(time.perf_counter() - t0, 1),
        "final_loss": round(sum(losses[-25:]) / len(losses[-25:]), 5),
        "early_stop": stopped,
        "loss": "MSE(cos(u, v), score / 5)",
        "optimizer": "AdamW, 10% warm-up, linear decay",
    }


def variants(ps: list[float], seeds: list[int], methods: list[str]) -> list[dict]:
    out = []
    for p in ps:
        for method in methods:
            out += [{"method": method, "p": p, "seed": s} for s in (seeds if method in RANDOM else [0])]
    return out


def stage_config(v: dict, val_file: Path | None) -> dict:
    """The prune.delta stage table for one variant (darex-q-grid: darex-q with q scored on val_file)."""
    if v["method"] == "darex-q-grid":
        return {"type": "prune.delta", **v, "method": "darex-q", "q_search": "grid", "eval_file": str(val_file)}
    return {"type": "prune.delta", **v}


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(f"{sum(xs) / len(xs):.4g}") if xs else None


def summarise(rows: list[dict]) -> list[dict]:
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["p"]), []).append(r)
    out = []
    for (method, p), rs in groups.items():
        s = np.array([r["stsb_dev"] for r in rs])
        qs = [r["q"] for r in rs if r["q"] is not None]
        out.append(
            {
                "method": method,
                "p": p,
                "runs": len(rs),
                "stsb_mean": round(float(s.mean()), 3),
                "stsb_std": round(float(s.std(ddof=1)), 3) if len(rs) > 1 else None,
                "q_mean": round(float(np.mean(qs)), 4) if qs else None,
                "q_best_loss": _mean([r.get("q_best_loss") for r in rs]),
                "q_dare_loss": _mean([r.get("q_dare_loss") for r in rs]),
                "size_pct": round(float(np.mean([r["delta_size_pct"] for r in rs])), 3),
                "delta_bytes": int(np.mean([r["delta_bytes"] for r in rs])),
                "kept_fraction": round(float(np.mean([r["kept_fraction"] for r in rs])), 5),
            }
        )
    return out


def markdown(res: dict) -> str:
    t = res["train"]
    lines = [
        "# Delta-parameter pruning: MiniLM fine-tuned on STS-B train, scored on STS-B dev",
        "",
        f"Command: `{res['command']}`  ",
        f"Host: {res['host']}; torch {res['versions']['torch']}, {res['threads']} thread(s); "
        f"{res['seconds_total']:.0f} s in all.",
        "",
        f"Fine-tuning: {t['steps']}/{t['planned_steps']} steps of batch {t['batch']} ({t['steps'] * t['batch']} of "
        f"{t['train_pairs']} STS-B train pairs), lr {t['lr']}, {t['loss']}, {t['seconds']:.0f} s, final loss "
        f"{t['final_loss']}" + (f" ({t['early_stop']})" if t["early_stop"] else "") + ".",
        f"Fine-tuning delta: mean |Δ| {res['delta']['mean_abs_delta']:.3g} (DARE assumes ≲ 0.005), max |Δ| "
        f"{res['delta']['max_abs_delta']:.3g}, {res['delta']['changed_fraction'] * 100:.1f} % of the "
        f"{res['delta']['params'] / 1e6:.1f} M entries changed."
        + (
            f" {res['val_pairs']} seeded STS-B train pairs were held out of fine-tuning for the grid q search."
            if res.get("val_pairs")
            else ""
        ),
        "",
        "| model | method | p | STS-B dev Spearman x100 (mean ± std) | runs | q | delta file, % of fp32 model |",
        "|---|---|---|---|---|---|---|",
        f"| base (`minilm`) | - | - | {res['base_stsb']:.2f} | 1 | - | - |",
        f"| fine-tuned | - | - | {res['finetuned_stsb']:.2f} | 1 | - | - |",
    ]
    for s in res["summary"]:
        std = f" ± {s['stsb_std']:.2f}" if s["stsb_std"] is not None else ""
        q = f"{s['q_mean']:.3f}" if s["q_mean"] is not None else "-"
        lines.append(
            f"| pruned | {LABELS[s['method']]} | {s['p']} | {s['stsb_mean']:.2f}{std} | {s['runs']} | {q} | "
            f"{s['size_pct']:.2f} % |"
        )
    ex = res["apply_delta_exact"]
    lines += [
        "",
        f"Delta file at p = {ex['p']}: {res['size_at_max_p']['delta_bytes'] / 1e6:.2f} MB = "
        f"{res['size_at_max_p']['pct']:.2f} % of the fp32 model's {res['model_fp32_bytes'] / 1e6:.1f} MB "
        "(int32 indices + fp32 values of the kept entries; DARE/DAREx-q, mean over seeds).",
        f"apply-delta exactness ({LABELS[ex['method']]}, p = {ex['p']}, seed {ex['seed']}): base + delta.safetensors "
        f"rebuilt with `compress.pipeline.rebuild_from_delta`, torch outputs on {ex['texts']} held-out sentences: "
        f"identical = {ex['identical']}, max abs diff {ex['max_abs_diff']}.",
        "",
        "DAREx-q's unlabelled objective, mean |h(pruned) − h(fine-tuned)| on 50 calibration sentences (mean over "
        "seeds), at the chosen q vs at q = 1-p (plain DARE, same mask): "
        + "; ".join(
            f"p = {s['p']}: {s['q_best_loss']:.3g} vs {s['q_dare_loss']:.3g}"
            for s in res["summary"]
            if s["method"] == "darex-q" and s["q_best_loss"] is not None
        )
        + ".",
        *(
            [
                "DAREx-q (q on held-out train): q maximises STS-B Spearman on the held-out train pairs (q_search = "
                '"grid"), never on dev; objective (-Spearman x100) at the chosen q vs at q = 1-p: '
                + "; ".join(
                    f"p = {s['p']}: {s['q_best_loss']:.4g} vs {s['q_dare_loss']:.4g}"
                    for s in res["summary"]
                    if s["method"] == "darex-q-grid" and s["q_best_loss"] is not None
                )
                + "."
            ]
            if any(s["method"] == "darex-q-grid" for s in res["summary"])
            else []
        ),
        "Sizes: int32 index + fp32 value = 8 bytes per kept entry against 4 per dense entry, so the sparse file "
        "only beats a dense fp32 delta when fewer than half the entries are kept; entries with Δ = 0 are never "
        "stored, and every method keeps round((1-p) n) of a tensor's n changed entries (DARE in expectation).",
        "",
        "q: DARE rescales survivors by 1/(1-p); DAREx-q by 1/q with q chosen to minimise mean |h(pruned) − "
        "h(fine-tuned)| on 50 unlabelled calibration sentences; magnitude and importance keep the top (1-p) "
        "entries per tensor without rescaling (deterministic, one run).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ps", default="0.5,0.9,0.99")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument(
        "--max-steps",
        type=int,
        default=240,
        help="training steps (0: all epochs); 240 x 16 pairs is 2/3 of an epoch, about 5-6 minutes on one busy core",
    )
    ap.add_argument("--max-train-minutes", type=float, default=8.0, help="safety stop for training")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: kind to a busy shared 2-core host)")
    ap.add_argument("--stsb", type=Path, default=STSB, help="folder holding sts-train.csv and sts-dev.csv")
    ap.add_argument(
        "--methods",
        default="dare,darex-q,magnitude,importance",
        help=f"comma-separated, from {','.join(LABELS)} (darex-q-grid needs --val-pairs)",
    )
    ap.add_argument(
        "--val-pairs",
        type=int,
        default=0,
        help="STS-B train pairs held out of fine-tuning; > 0 adds darex-q-grid (q chosen on them) to --methods",
    )
    ap.add_argument("--name", default="delta", help="results go to benchmarks/results/NAME.{json,md}")
    ap.add_argument("--force", action="store_true", help="overwrite existing results of that --name")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if args.val_pairs > 0 and "darex-q-grid" not in methods:
        methods.append("darex-q-grid")
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        sys.exit(f"unknown --methods {', '.join(unknown)}: use some of {', '.join(LABELS)}")
    if "darex-q-grid" in methods and args.val_pairs <= 0:
        sys.exit("darex-q-grid chooses q on held-out train pairs: pass --val-pairs N (e.g. 300)")
    out_json, out_md = RESULTS / f"{args.name}.json", RESULTS / f"{args.name}.md"
    if not args.force and (out_json.exists() or out_md.exists()):
        sys.exit(f"{out_json} exists: pass --force to overwrite it or another --name")
    train_path, dev_path = args.stsb / "sts-train.csv", args.stsb / "sts-dev.csv"
    missing = [str(p) for p in (train_path, dev_path) if not p.is_file()]
    if missing:
        sys.exit(
            f"STS-B not found ({', '.join(missing)}): put sts-train.csv and sts-dev.csv in {args.stsb} "
            "or pass --stsb FOLDER"
        )
    _quiet_libraries()

    import numpy as np
    import torch

    from compress.core.data import calibration_and_heldout, read_stsb, shipped_sentences
    from compress.core.evaluate import stsb_spearman
    from compress.core.models import load_model, torch_outputs
    from compress.pipeline import rebuild_from_delta
    from compress.recipe import parse_recipe
    from compress.stages.delta_io import delta_tensors
    from compress.steps import apply_torch_stages
    from runtimes.host import host_info

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    ps = [float(p) for p in args.ps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    score = lambda lm: stsb_spearman(lambda texts: torch_outputs(lm, texts), dev_path)

    base = load_model("minilm")
    base_stsb = score(base)
    print(f"base minilm: STS-B dev {base_stsb:.2f}", flush=True)
    print(f"fine-tuning on {train_path} ...", flush=True)
    train_pairs, val_pairs = split_validation(read_stsb(train_path), args.val_pairs)
    train = fine_tune(
        base, train_pairs, args.epochs, args.batch, args.lr, args.max_steps, args.max_train_minutes, seed=0
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        work = Path(tmp)
        val_file = None
        if val_pairs is not None:
            val_file = work / "val.tsv"
            write_stsb(val_pairs, val_file)
        base.model.save(str(work / "ft"))
        del base
        ft = load_model(str(work / "ft"))
        ft_stsb = score(ft)
        print(f"fine-tuned: STS-B dev {ft_stsb:.2f} ({train['seconds']:.0f} s)", flush=True)
        ft_t = delta_tensors(ft.model)
        base_t = delta_tensors(load_model("minilm").model)
        d = {n: ft_t[n].float() - base_t[n].float() for n in ft_t}
        n_all = sum(x.numel() for x in d.values())
        delta_stats = {
            "params": n_all,
            "mean_abs_delta": float(sum(float(x.abs().sum()) for x in d.values()) / n_all),
            "max_abs_delta": max(float(x.abs().max()) for x in d.values()),
            "changed_fraction": sum(int((x != 0).sum()) for x in d.values()) / n_all,
        }
        del d, base_t, ft_t

        exact_case = {"method": "darex-q" if "darex-q" in methods else methods[0], "p": max(ps), "seed": seeds[0]}
        exact = None
        for i, v in enumerate(variants(ps, seeds, methods)):
            t0 = time.perf_counter()
            recipe = parse_recipe({"stages": [stage_config(v, val_file)]}, "bench", "benchmark")
            out_dir = work / f"v{i}"
            out_dir.mkdir()
            lm, reports = apply_torch_stages(
                list(recipe.stages), copy.deepcopy(ft), calibration, artifact_dir=out_dir, base_model="minilm"
            )
            m = reports[0]["metrics"]
            row = {
                **v,
                "q": m["q"],
                "stsb_dev": round(score(lm), 3),
                "delta_bytes": m["delta_bytes"],
                "delta_size_pct": m["delta_size_pct"],
                "kept_fraction": m["kept_fraction"],
                "q_tries": m["q_search"]["tries"] if m["q_search"] else None,
                "q_best_loss": m["q_search"]["best_loss"] if m["q_search"] else None,
                "q_dare_loss": m["q_search"]["dare_loss"] if m["q_search"] else None,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            q = f" q={row['q']:.4f}" if row["q"] is not None else ""
            print(
                f"  {v['method']:<10} p={v['p']:<5} seed={v['seed']}{q}: STS-B dev {row['stsb_dev']:.2f}, "
                f"delta {row['delta_size_pct']:.2f} % of fp32 ({row['seconds']:.0f} s)",
                flush=True,
            )
            if v == exact_case:
                rebuilt = work / "rebuilt"
                rebuild_from_delta("minilm", out_dir / "delta.safetensors", rebuilt)
                a, b = torch_outputs(lm, heldout), torch_outputs(load_model(str(rebuilt)), heldout)
                exact = {
                    **v,
                    "texts": len(heldout),
                    "identical": bool(np.array_equal(a, b)),
                    "max_abs_diff": float(np.abs(a - b).max()),
                }
                print(f"  apply-delta exactness: {exact}", flush=True)
            del lm

    summary = summarise(rows)
    random_at_max = [r for r in rows if r["p"] == max(ps) and r["method"] in RANDOM] or [
        r for r in rows if r["p"] == max(ps)
    ]
    size_bytes = int(np.mean([r["delta_bytes"] for r in random_at_max]))
    model_bytes = 4 * delta_stats["params"]
    res = {
        "command": "python " + " ".join(["benchmarks/delta.py"] + sys.argv[1:]),
        "host": host_info().summary(),
        "threads": args.threads,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "train": train,
        "base_stsb": round(base_stsb, 3),
        "finetuned_stsb": round(ft_stsb, 3),
        "delta": delta_stats,
        "model_fp32_bytes": model_bytes,
        "val_pairs": args.val_pairs,
        "methods": methods,
        "size_at_max_p": {"p": max(ps), "delta_bytes": size_bytes, "pct": round(100 * size_bytes / model_bytes, 3)},
        "apply_delta_exact": exact,
        "summary": summary,
        "rows": rows,
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out_md.write_text(md)
    print("\n" + md)
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main()
