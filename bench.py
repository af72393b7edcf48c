"""
bench.py: how much quality each conversion keeps, side by side on the demo model.

    python bench.py quality                          # the README quality table (about 25 min on 2 cores)
    python bench.py quality --methods expertweaver --active 0.75 --tau 0.6 0.3 0.2   # an ablation

quality: calibrates once on the files in --data (default ../shared/data: prose, dialogue, math, code),
converts the demo model with every method x active fraction (x every value of each list-valued knob),
and reports held-out perplexity as a ratio to the dense model's on the same windows: the last 10% of
each file, which calibration never reads.
"""
import itertools
import json
import os
import time

import torch

from model import demo_checkpoint, load_model, load_tokenizer, perplexity
from weaver import ConvertSpec, calibration_from_files, convert, geomean, heldout_tokens

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
TASK_FILES = {"prose": "wikitext2-valid.txt", "dialogue": "tinyshakespeare.txt", "math": "gsm8k-train.jsonl",
              "code": "code-pytorch-examples.py.txt"}

# -----------------------------------------------------------------------------
# quality


def quality(data: str, methods: list[str], actives: list[float], routers: list[str], grid: dict[str, list],
            calib_samples: int, calib_seqlen: int, eval_seqlen: int, eval_windows: int, holdout: float,
            seed: int, json_out: str | None) -> list[dict]:
    path = demo_checkpoint()
    tokenizer = load_tokenizer(path)
    files = {task: os.path.join(data, f) for task, f in TASK_FILES.items()}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"bench quality needs the task files in --data; missing: {', '.join(missing)}")
    specs = [f"{f}:{task}" for task, f in files.items()]
    calib = calibration_from_files(tokenizer, specs, calib_samples, calib_seqlen, seed, holdout)
    evals = {task: heldout_tokens(tokenizer, f, holdout) for task, f in files.items()}
    print(f"calibration: {len(calib.names)} tasks x {calib_samples} windows x {calib_seqlen} tokens; evaluation: "
          f"held-out last {holdout:.0%} of each file, {eval_windows} windows x {eval_seqlen} tokens")

    def ppl_per_task(model):
        return {task: perplexity(model, tokens, eval_seqlen, eval_windows)[1] for task, tokens in evals.items()}

    t0 = time.time()
    dense = ppl_per_task(load_model(path))
    print(f"dense ppl: " + ", ".join(f"{t} {p:.3f}" for t, p in dense.items()) + f" ({time.time() - t0:.0f}s)")
    rows = []
    knobs = [k for k, values in grid.items() if len(values) > 1]  # the ones that become table columns
    configs = [(m, r, a, values) for a in actives for m in methods for r in routers
               for values in itertools.product(*grid.values())
               if not (m == "static" and r not in ("default", "none")) and not (m != "static" and r == "none")]
    for method, router, active, values in configs:
        extra = dict(zip(grid, values))
        spec = ConvertSpec(method=method, active=active, router=None if router == "default" else router,
                           seed=seed, **extra)
        model = load_model(path)
        t0 = time.time()
        convert(model, calib, spec, log=lambda *_: None)
        seconds = time.time() - t0
        ppl = ppl_per_task(model)
        ratios = {t: ppl[t] / dense[t] for t in ppl}
        row = {"method": method, "router": spec.router, "active": active, **{k: extra[k] for k in knobs}, "ratio": ratios,
               "geomean": geomean(ratios.values()), "ppl": ppl, "convert_seconds": seconds}
        rows.append(row)
        print(format_row(row, knobs))
    print_table(rows, knobs, dense)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"dense_ppl": dense, "rows": rows}, f, indent=2)
    return rows


def format_row(row: dict, knobs: list[str]) -> str:
    extra = "".join(f" {k}={row[k]}" for k in knobs)
    ratios = "  ".join(f"{t} x{r:.3f}" for t, r in row["ratio"].items())
    return (f"{row['method']:>12} {row['router']:>8} active {row['active']:.2f}{extra}: {ratios}  "
            f"geomean x{row['geomean']:.3f}  ({row['convert_seconds']:.0f}s)")


def print_table(rows: list[dict], knobs: list[str], dense: dict) -> None:
    tasks = list(dense)
    head = ["method", "router", "active", *knobs, *tasks, "geomean", "convert s"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    print("| dense | | 1.00 | " + "".join(" |" for _ in knobs) + " | ".join(f"ppl {dense[t]:.2f}" for t in tasks) + " | 1.000 | |")
    for r in rows:
        cells = [r["method"], r["router"], f"{r['active']:.2f}", *(str(r[k]) for k in knobs),
                 *(f"{r['ratio'][t]:.3f}" for t in tasks), f"**{r['geomean']:.3f}**", f"{r['convert_seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Benchmarks: quality of every conversion method on the demo model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="held-out ppl ratio MoE / dense for methods x active fractions",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--data", default=DATA, help=f"directory holding {', '.join(TASK_FILES.values())}")
    q.add_argument("--methods", nargs="+", default=["expertweaver", "cmoe", "static", "random"])
    q.add_argument("--routers", nargs="+", default=["default"],
                   help="default (each method's own), centroid, cmoe, oracle; every method x router pair is run")
    q.add_argument("--active", nargs="+", type=float, default=[0.9, 0.75, 0.5], help="active fractions")
    q.add_argument("--experts", nargs="+", type=int, default=[64], help="N_e values")
    q.add_argument("--tau", nargs="+", type=float, default=[0.6], help="CV thresholds")
    q.add_argument("--alpha-min", nargs="+", type=float, default=[0.2])
    q.add_argument("--alpha-max", nargs="+", type=float, default=[0.7])
    q.add_argument("--kmeans-iters", nargs="+", type=int, default=[50])
    q.add_argument("--sequential", nargs="+", type=int, default=[0], help="0: profile on dense outputs, 1: sequential")
    q.add_argument("--calib-samples", type=int, default=8, help="calibration windows per task")
    q.add_argument("--calib-seqlen", type=int, default=256)
    q.add_argument("--eval-seqlen", type=int, default=512)
    q.add_argument("--eval-windows", type=int, default=8, help="held-out windows per task")
    q.add_argument("--holdout", type=float, default=0.1)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    if a.command == "quality":
        # knobs given more than one value become table columns; single values are just settings
        grid = {"n_experts": a.experts, "tau": a.tau, "alpha_min": a.alpha_min, "alpha_max": a.alpha_max,
                "kmeans_iters": a.kmeans_iters, "sequential": [bool(s) for s in a.sequential]}
        quality(a.data, a.methods, a.active, a.routers, grid, a.calib_samples, a.calib_seqlen, a.eval_seqlen,
                a.eval_windows, a.holdout, a.seed, a.json)
