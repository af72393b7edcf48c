"""
experiments.py: the RESULTS.md experiments on the demo model, each against the dense model (or the
dense model trained alike) in the same run.

    python experiments.py quality            # held-out ppl ratio, every method x active fraction
    python experiments.py quality --rows expertweaver:lsq:tau=0.3 --active 0.75   # an ablation
    python experiments.py plot q.json --out frontier.png   # a quality run's picture, again
    python experiments.py heal               # conversions healed with LoRA vs dense trained alike
    python experiments.py downcycle          # initialisations of a sparser MoE trained alike
    python experiments.py dive               # DIVE, the default and CMoE, before and after training
    python experiments.py export             # the Qwen2-MoE export, run by transformers
    python experiments.py served             # the exportable configuration, chosen and served
    python experiments.py hierarchy          # an MoE's experts split again, against one level

Imports model.py, weaver.py, dive.py, data.py, checkpoint.py, demo.py, export.py, convert.py (the
drivers), train.py, bench.py (the header, tables and plots) and flags.py (--help). The text is
../shared/data (prose, dialogue, math, code): calibration reads each file's head, evaluation only
the last 10%, which calibration and training never read.

quality: calibrates once, converts the demo model with every row (a method, its router and
settings) x active fraction, and reports held-out perplexity as a ratio to the dense model's on the
same windows. Also the FFN FLOPs used per token, router included, and the share of the centroid ->
oracle gap each router closes.
"""
import functools
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from bench import DATA, LAYOUTS, TASK_FILES, draw, header, print_table, run_cli
from checkpoint import save_checkpoint
from convert import convert_checkpoint, convert_model, spec_class
from data import (TASKS, Calibration, calibration_from_files, heldout_tokens, perplexity,
                  read_text, score_tasks, split_heldout)
from demo import DEMOS, demo_checkpoint
from dive import DiveSpec
from export import EXPORT_EPS, Served, export_problems, export_qwen2_moe
from model import MoEMLP, load_config, load_model, load_tokenizer
from weaver import ROUTER_FLOPS, ConvertSpec

# -----------------------------------------------------------------------------
# quality: held-out perplexity of every conversion, against the dense model



def task_files(data: str, command: str) -> dict[str, str]:
    files = {task: os.path.join(data, f) for task, f in TASK_FILES.items()}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"experiments.py {command} needs the task files in --data "
                                f"(../shared/data beside the repository, or --data DIR); "
                                f"missing: {', '.join(missing)}")
    return files


def check_tasks(data: str, tasks) -> str:
    """The zero-shot tasks' files in DATA/eval read once, so that a missing or bad one is refused
    before any slow work; -> that directory."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"--tasks {', '.join(unknown)}: not among {', '.join(TASKS)}")
    eval_dir = os.path.join(data, "eval")
    for task in tasks:
        TASKS[task][0](eval_dir)
    return eval_dir


def ffn_flops(cfg) -> dict:
    """Per token, summed over layers: FLOPs of the dense FFNs, of the MoE FFNs' experts, and of
    their routers (multiply-adds x 2; weaver.ROUTER_FLOPS). A layer split by a recursive conversion
    (recursive.py) counts each chosen expert's whole part and chosen parts, its converted shared
    expert, and the inner router as model.SplitExperts runs it: over every expert's parts, E J
    rows, of which the token then keeps those of its K experts. A compensated layer's biases add
    (k + 1) D."""
    D, d_ff = cfg.dim, cfg.ffn_dim
    per_router = {kind: functools.partial(cost, D) for kind, cost in ROUTER_FLOPS.items()}

    def one_level(entry: dict) -> tuple[int, int]:  # (experts, router) of an entry of one level
        d_e, E, k = entry["expert_dim"], entry["routed_experts"], entry["top_k"]
        compensation = D * (k + 1) if entry.get("compensated") and E else 0  # bias adds
        return 6 * D * (entry["shared_neurons"] + k * d_e) + compensation, \
            per_router[entry["router"]](E, E * d_e) if k else 0
    dense = experts = router = 0
    for layer in (cfg.moe["layers"] if cfg.moe else [None] * cfg.n_layers):
        dense += 6 * D * d_ff
        if layer is None:
            experts += 6 * D * d_ff
            continue
        outer = {**layer, "expert_dim": cfg.moe["expert_dim"], "router": cfg.moe["router"],
                 "compensated": cfg.moe.get("compensated", False)}
        if "split" not in layer:
            e, r = one_level(outer)
        else:
            K, E, split = layer["top_k"], layer["routed_experts"], layer["split"]
            inner = {**split, "routed_experts": E * split["routed_experts"]}  # the router's rows
            parts, inner_router = one_level(inner)
            e, r = K * parts, per_router[cfg.moe["router"]](E, 0) + inner_router
            shared = layer.get("shared_split")
            shared_cost = one_level(shared) if shared else (6 * D * layer["shared_neurons"], 0)
            e, r = e + shared_cost[0], r + shared_cost[1]
        experts, router = experts + e, router + r
    return {"dense": dense, "experts": experts, "router": router}


class SelectionCounter:
    """While open, counts the experts each threshold-selecting MoE layer (model.MoEMLP.threshold)
    of a model gives the tokens it runs, from the router's scores; `top_k_seen(cfg)` is then cfg
    with each such layer's top_k the mean seen, the figure its FLOPs are counted at."""

    def __init__(self, model):
        self.layers = {i: b.mlp for i, b in enumerate(model.layers)
                       if isinstance(b.mlp, MoEMLP) and b.mlp.threshold is not None}
        self.counts = {i: [0, 0] for i in self.layers}  # layer -> [experts chosen, tokens]

    def __enter__(self):
        def count(i, mlp, _module, _args, scores):
            idx = mlp.choose(scores)[0]
            self.counts[i][0] += int((idx >= 0).sum())
            self.counts[i][1] += len(idx)
        self.hooks = [mlp.router.register_forward_hook(functools.partial(count, i, mlp))
                      for i, mlp in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def top_k_seen(self, cfg):
        layers = [dict(layer, top_k=self.counts[i][0] / self.counts[i][1])
                  if i in self.counts and self.counts[i][1] else layer
                  for i, layer in enumerate(cfg.moe["layers"])]
        return replace(cfg, moe={**cfg.moe, "layers": layers})


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


# ExpertWeaver as published: the paper's 64 experts, its allocation rule, router and neuron ranking
PAPER = "expertweaver:centroid:shared_by=activation:n_experts=64:allocation=cv"
# the default before issue #26, which RESULTS.md's older sections were measured with and bench.py
# times: "expertweaver:n_experts=64:allocation=cv:router_bias=true"
OLD_DEFAULT = ":".join(["expertweaver"] + [f"{k}={str(v).lower()}"
                                           for k, v in LAYOUTS["old"].items()])
# the two selectable settings beyond the papers that issue #26 asked beside the default
GLOBAL, THRESHOLD = "expertweaver:budget=global", "expertweaver:selection=threshold"
DEFAULT_ROWS = [PAPER, "cmoe", "static", OLD_DEFAULT, "expertweaver",
                "expertweaver:router_bias=true", GLOBAL, THRESHOLD]


def parse_row(row: str) -> dict:
    """'method[:router][:key=value...]' -> ConvertSpec (DiveSpec) keyword arguments."""
    method, *rest = row.split(":")
    spec = {"method": method}
    settings = spec_class(method)
    for part in rest:
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in settings.__dataclass_fields__:
                raise ValueError(f"row {row!r}: {key!r} is not a {settings.__name__} field")
            default = getattr(settings, key)
            if not isinstance(default, str):
                try:
                    value = json.loads(value.lower())  # numbers and true/false
                except json.JSONDecodeError:
                    if default is not None:  # a field without a default may take a word
                        raise ValueError(f"row {row!r}: {key}={value} is not a number or "
                                         f"true/false") from None
            spec[key] = float(value) if isinstance(default, float) else value
        else:
            spec["router"] = part
    return spec


def row_specs(rows: list[str], actives: list[float], seed: int, cfg=None, **layout) -> dict:
    """{(row, active): ConvertSpec} for every row ('+keep' and the like cut off) and active
    fraction, checked (against the model's shapes, given its cfg) before any slow work, so that a
    bad row or fraction is refused at once."""
    specs = {}
    for active in actives:
        for row in rows:
            try:
                settings = parse_row(row.partition("+")[0])
                if "active" in settings:
                    raise ValueError("the active fraction is --active's, not a row's")
                # a row's seed re-seeds the partition only: the calibration is --seed's
                spec = spec_class(settings["method"])(**{"active": active, "seed": seed,
                                                         **layout, **settings})
                if cfg is not None:
                    spec.check_layers(cfg.ffn_dim, cfg.n_layers, cfg.dim)
            except ValueError as e:
                raise ValueError(f"row {row!r} at --active {active}: {e}") from None
            specs[row, active] = spec
    return specs


def quality(data: str, rows: list[str], actives: list[float], calib_samples: int, calib_seqlen: int,
            eval_seqlen: int, eval_windows: int, holdout: float, seed: int,
            plot: str | None = None, plot_rows: list[str] | None = None, tasks: tuple = (),
            task_limit: int | None = None, model_name: str = "demo") -> list[dict]:
    """Held-out perplexity of every row x active fraction against the dense model's and, with
    tasks, zero-shot accuracy on them (data.TASKS, the first task_limit items of each), on the demo
    model_name (demo.DEMOS)."""
    files = task_files(data, "quality")
    eval_dir = check_tasks(data, tasks)
    path = demo_checkpoint(model_name)
    cfg = load_config(path)[0]
    specs = row_specs(rows, actives, seed, cfg)
    unknown = set(plot_rows or ()) - set(rows)
    if unknown:
        raise ValueError(f"--plot-rows {', '.join(sorted(unknown))}: not among --rows")
    tokenizer = load_tokenizer(path)
    entries = [f"{f}:{task}" for task, f in files.items()]  # FILE:TASK, as --calib takes them
    calib = calibration_from_files(tokenizer, entries, calib_samples, calib_seqlen, seed, holdout,
                                   bos=cfg.prefix_bos)
    evals = {task: heldout_tokens(tokenizer, f, holdout) for task, f in files.items()}
    print(f"{model_name} ({path}); calibration: {len(calib.names)} tasks x {calib_samples} "
          f"windows x {calib_seqlen} tokens; evaluation: held-out last {holdout:.0%} of each "
          f"file, {eval_windows} windows x {eval_seqlen} tokens")

    def ppl_per_task(model):
        return {task: perplexity(model, tokens, eval_seqlen, eval_windows)[1]
                for task, tokens in evals.items()}

    t0 = time.time()
    dense_model = load_model(path)
    dense = ppl_per_task(dense_model)
    print("dense ppl: " + ", ".join(f"{t} {p:.3f}" for t, p in dense.items())
          + f" ({time.time() - t0:.0f}s)")
    dense_acc = score_tasks(dense_model, tokenizer, eval_dir, tasks, task_limit) if tasks else {}
    del dense_model
    results = []
    for (row, active), spec in specs.items():
        model = load_model(path)
        t0 = time.time()
        convert_model(model, calib, spec, log=lambda *_: None)
        seconds = time.time() - t0
        with SelectionCounter(model) as seen:  # threshold selection: FLOPs as used on this text
            ppl = ppl_per_task(model)
        flops = ffn_flops(seen.top_k_seen(model.cfg))
        ratios = {t: ppl[t] / dense[t] for t in ppl}
        used = flops["experts"] + flops["router"]
        result = {"row": row, "router": spec.router, "active": active, "ratio": ratios,
                  "geomean": geomean(ratios.values()), "ppl": ppl, "convert_seconds": seconds,
                  "router_share": flops["router"] / used, "active_flops": used / flops["dense"]}
        if tasks:
            result["tasks"] = score_tasks(model, tokenizer, eval_dir, tasks, task_limit)
        results.append(result)
        print(f"{row:>55} active {active:.2f}: "
              + "  ".join(f"{t} x{r:.3f}" for t, r in ratios.items())
              + f"  geomean x{result['geomean']:.3f}  router {result['router_share']:.1%} of "
              f"MoE FLOPs ({seconds:.0f}s)", flush=True)
    print_quality_tables(results, dense)
    if tasks:
        print_accuracy_table(results, dense_acc)
    if plot:
        draw_quality(plot, results, plot_rows or rows, model_name)
    return [{"row": "dense", "ppl": dense, **({"tasks": dense_acc} if tasks else {})}] + results


RATIO_TICKS = [1, 1.1, 1.25, 1.5, 2, 3, 4, 6]  # the frontier picture's log axis


def draw_quality(file: str, results: list[dict], rows: list[str], model_name: str) -> None:
    """The frontier picture: a line per row, geomean held-out ratio against the FFN FLOPs used."""
    lines = [(row, *zip(*sorted((100 * r["active_flops"], r["geomean"])
                                for r in results if r["row"] == row)))
             for row in rows]
    draw(file, lines, "FFN FLOPs used per token, router included (% of the dense FFN)",
         "held-out ppl / dense ppl (geomean of 4 tasks, log scale)",
         f"{model_name} converted: quality against compute", log_ticks=RATIO_TICKS,
         legend_below=True)


def replot(files: list[str], out: str, rows: list[str] | None) -> list[dict]:
    """The quality picture drawn again from the --json files of `quality` runs on one model,
    merged, without converting anything: the rows (default: every row they hold, in order)."""
    results, models = [], set()
    for file in files:
        with open(file) as f:
            saved = json.load(f)
        if saved.get("command") != "quality":
            raise ValueError(f"{file}: not the --json of a quality run (its command is "
                             f"{saved.get('command')!r})")
        models.add(saved["args"]["model"])
        results += [r for r in saved["rows"] if r["row"] != "dense"]
    if len(models) != 1:
        raise ValueError(f"{', '.join(files)}: runs on different models ({sorted(models)})")
    held = list(dict.fromkeys(r["row"] for r in results))
    missing = [row for row in rows or () if row not in held]
    if missing:
        raise ValueError(f"--rows {', '.join(missing)}: not in {', '.join(files)}")
    draw_quality(out, results, rows or held, models.pop())
    return []


def retained(scores: dict, dense: dict) -> tuple[float | None, list[str]]:
    """The share of the dense model's accuracy above chance that `scores` keep, pooled over the
    tasks (each on its main metric): sum(acc - chance) / sum(dense acc - chance), leaving out the
    tasks whose dense accuracy is within two standard errors of chance. -> (share, tasks left
    out)."""
    main = lambda r: (r[r["main"]], r[r["main"] + "_stderr"])
    near = [t for t, r in dense.items() if main(r)[0] - r["chance"] < 2 * main(r)[1]]
    kept = [t for t in dense if t not in near]
    above = sum(main(dense[t])[0] - dense[t]["chance"] for t in kept)
    if not kept or above <= 0:
        return None, near
    return sum(main(scores[t])[0] - scores[t]["chance"] for t in kept) / above, near


def print_accuracy_table(results: list[dict], dense: dict) -> None:
    tasks = list(dense)
    _, near = retained(dense, dense)
    n = {t: dense[t]["items"] for t in tasks}
    print("\nzero-shot accuracy, scored as lm-eval scores it (acc_norm where lm-eval reports it, "
          "else acc; +- standard error); items: " + ", ".join(f"{t} {n[t]}" for t in tasks)
          + (f"; left out of the retained share, within 2 standard errors of chance when dense: "
             f"{', '.join(near)}" if near else "") + "\n")
    cell = lambda r: f"{r[r['main']]:.3f} +- {r[r['main'] + '_stderr']:.3f}"
    mean = lambda scores: sum(r[r["main"]] for r in scores.values()) / len(scores)
    table = [["dense", "1.00", *(cell(dense[t]) for t in tasks), f"{mean(dense):.3f}", "100%"]]
    for r in results:
        share, _ = retained(r["tasks"], dense)
        table.append([f"`{r['row']}`", f"{r['active']:.2f}", *(cell(r["tasks"][t]) for t in tasks),
                      f"{mean(r['tasks']):.3f}", "-" if share is None else f"{share:.1%}"])
    print_table(["row", "active", *tasks, "mean", "retained above chance"], table)


def print_quality_tables(results: list[dict], dense: dict) -> None:
    tasks = list(dense)
    print("\nppl ratio MoE / dense on held-out text\n")
    table = [["dense", "1.00", *(f"ppl {dense[t]:.2f}" for t in tasks), "1.000", "100%", ""]]
    for r in results:
        table.append([f"`{r['row']}`", f"{r['active']:.2f}",
                      *(f"{r['ratio'][t]:.3f}" for t in tasks), f"**{r['geomean']:.3f}**",
                      f"{r['active_flops']:.1%} ({r['router_share']:.1%})",
                      f"{r['convert_seconds']:.0f}"])
    print_table(["row", "active", *tasks, "geomean", "FFN FLOPs used (router share)", "convert s"],
                table)
    # how much of the way from the paper's router to the oracle each row goes, same partition: the
    # rows expertweaver:centroid[:settings] and expertweaver:oracle[:the same settings]
    ends, names = {}, {}  # settings -> router -> active -> result; settings -> the two row names
    for r in results:
        method, _, rest = r["row"].partition(":")
        router, _, settings = rest.partition(":")
        if method == "expertweaver" and router in ("centroid", "oracle"):
            ends.setdefault(settings, {}).setdefault(router, {})[r["active"]] = r
            names.setdefault(settings, set()).add(r["row"])
    settings = next((s for s, e in ends.items() if len(e) == 2), None)
    if settings is None:
        return
    base, best = ends[settings]["centroid"], ends[settings]["oracle"]
    print("\nshare of the centroid -> oracle gap closed (ExpertWeaver partition)\n")
    table = []
    for r in results:
        a = r["active"]
        if a in base and a in best and r["row"] not in names[settings]:
            start, end = base[a]["ratio"], best[a]["ratio"]
            gap = [(start[t] - r["ratio"][t]) / (start[t] - end[t]) for t in tasks]
            table.append([f"`{r['row']}`", f"{a:.2f}", *(f"{g:.0%}" for g in gap)])
    print_table(["row", "active", *tasks], table)

# -----------------------------------------------------------------------------
# training: healing and downcycling, every ratio against the dense model trained the same way (same
# data, budget and trainable set: training on the tasks' text also lowers the dense model's
# perplexity on it)



def trained(checkpoint: str, out: str, spec, val_windows: int, val_every: int, label: str,
            val_seqlen: int = 512) -> dict:
    """train.train on one checkpoint -> validation ppl per task before and after, the validation
    loss curve (mean NLL over the tasks), tokens/s (median over steps) and wall seconds."""
    import train
    t0 = time.time()
    run = train.RunSpec(val_seqlen=val_seqlen, val_windows=val_windows, val_every=val_every,
                        log_every=8, device="cpu")
    rows = train.train(checkpoint, out, spec, run,
                       log=lambda line: print(f"  {label}: {line}", flush=True))
    vals = [r for r in rows if "val_ppl" in r]
    nll = lambda ppl: sum(math.log(p) for p in ppl.values()) / len(ppl)
    return {"before": vals[0]["val_ppl"], "after": vals[-1]["val_ppl"], "seconds": time.time() - t0,
            "curve": [(r["step"], nll(r["val_ppl"])) for r in vals],
            "tok_s": statistics.median(r["tok_s"] for r in rows if "tok_s" in r)}


def ratio_cells(ppl: dict, dense: dict) -> list[str]:
    ratios = {t: ppl[t] / dense[t] for t in ppl}
    return [f"{r:.3f}" for r in ratios.values()] + [f"**{geomean(ratios.values()):.3f}**"]


def training_setup(data: str, command: str, calib_samples: int, calib_seqlen: int, seed: int,
                   model_name: str = "demo", **common):
    """-> (TrainSpec maker with the common settings, the demo model_name's path, its calibration
    windows). Warm-up: a tenth of the budget's steps."""
    from train import TrainSpec
    steps = max(1, common["tokens"] // (common["seqlen"] * common["batch"]))
    common.setdefault("warmup", max(1, steps // 10))
    entries = tuple(f"{f}:{task}" for task, f in task_files(data, command).items())
    path = demo_checkpoint(model_name)
    calib = calibration_from_files(load_tokenizer(path), list(entries), calib_samples, calib_seqlen,
                                   seed, common["holdout"], bos=load_config(path)[0].prefix_bos)
    print(header("cpu", "float32"))
    return (lambda **kw: TrainSpec(data=entries, seed=seed, **{**common, **kw})), path, calib


def converted_into(path: str, out: str, calib: Calibration, spec: ConvertSpec,
                   log=lambda *_: None) -> dict:
    """The demo converted in float32 into `out`; -> the conversion's report."""
    return convert_checkpoint(path, out, calib, spec, torch.float32, "cpu", torch.float32, log=log)


def healed(moe: str, out: str, train_spec, convert_spec: ConvertSpec, val_windows: int, label: str,
           val_seqlen: int) -> dict:
    """A conversion healed with LoRA and its router, `scaled` routing (gamma = 0: training starts
    at the converted model itself); LoRA alone where nothing routes (static pruning)."""
    routed = convert_spec.router != "none"
    heal_spec = train_spec(train=("lora", "router"), routing="scaled") if routed else \
        train_spec(train=("lora",))
    return trained(moe, out, heal_spec, val_windows, 10**9, label, val_seqlen)


def dive_retrained(moe: str, work: str, train_spec, budget: dict, stage0: float, temperature: float,
                   val_windows: int, label: str, val_seqlen: int) -> dict:
    """DIVE's two stages: a `stage0` share of the tokens for the router alone over every expert at
    `temperature`, then LoRA + router + norms on the rest."""
    tokens0 = max(budget["seqlen"] * budget["batch"], int(budget["tokens"] * stage0))
    first = trained(moe, os.path.join(work, "s0"),
                    train_spec(train=("router",), dense_routing=temperature, tokens=tokens0),
                    val_windows, 10**9, f"{label} stage 0", val_seqlen)
    run = trained(os.path.join(work, "s0"), os.path.join(work, "healed"),
                  train_spec(train=("lora", "router", "norms"), lora_alpha=16.0,
                       tokens=budget["tokens"] - tokens0), val_windows, 10**9,
                  f"{label} stage 1", val_seqlen)
    return run | {"before": first["before"], "stage0": first["after"],
                  "seconds": first["seconds"] + run["seconds"]}


def scratch(command: str):
    """A temporary directory for a training command's checkpoints, removed at the end."""
    import tempfile
    return tempfile.TemporaryDirectory(prefix=f"expertweaver-{command}-",
                                       ignore_cleanup_errors=True)


def heal(data: str, rows: list[str], actives: list[float], budget: dict, calib_samples: int,
         calib_seqlen: int, val_windows: int, seed: int, val_seqlen: int = 512,
         model_name: str = "demo") -> list[dict]:
    """Each conversion of the demo model_name healed with LoRA (attention and every FFN
    projection) and its router, with scaled routing (gamma = 0: training starts at the converted
    model itself); the dense model gets the same LoRA, data and budget (tokens, seqlen, batch, lr,
    holdout)."""
    task_files(data, "heal")
    convert_specs = row_specs(rows, actives, seed, load_config(demo_checkpoint(model_name))[0])
    train_spec, path, calib = training_setup(
        data, "heal", calib_samples, calib_seqlen, seed, model_name, **budget
    )
    results = []
    with scratch("heal") as work:
        dense = trained(path, os.path.join(work, "dense"), train_spec(train=("lora",)), val_windows,
                        10**9, "dense", val_seqlen)
        for (row, active), convert_spec in convert_specs.items():
            moe = os.path.join(work, "moe")
            converted_into(path, moe, calib, convert_spec)
            run = healed(moe, os.path.join(work, "healed"), train_spec, convert_spec, val_windows,
                         f"{row} {active}", val_seqlen)
            results.append({"row": row, "active": active, **run})
    tasks = list(dense["before"])
    print(f"\nheld-out ppl ratio to the dense model before healing, and to the dense model healed "
          f"the same way after ({budget['tokens']} tokens, LoRA r 8 + router)\n")
    ppl_cells = lambda ppl: [f"ppl {ppl[t]:.2f}" for t in tasks]
    table = [["dense", "1.00", *ppl_cells(dense["before"]), "1.000", *ppl_cells(dense["after"]),
              "1.000", f"{dense['tok_s']:.0f}", f"{dense['seconds']:.0f}"]]
    for r in results:
        table.append([f"`{r['row']}`", f"{r['active']:.2f}",
                      *ratio_cells(r["before"], dense["before"]),
                      *ratio_cells(r["after"], dense["after"]),
                      f"{r['tok_s']:.0f} ({r['tok_s'] / dense['tok_s']:.2f})",
                      f"{r['seconds']:.0f}"])
    print_table(["row", "active", *(f"before {t}" for t in tasks), "before geomean",
                 *(f"after {t}" for t in tasks), "after geomean", "tok/s (x dense)", "train s"],
                table)
    return [{"row": "dense", **dense}] + results


def downcycle(data: str, rows: list[str], layout: dict, budget: dict, balance: float,
              calib_samples: int, calib_seqlen: int, val_windows: int, val_every: int, seed: int,
              plot: str | None, val_seqlen: int = 512) -> list[dict]:
    """The demo downcycled (layout: active, n_experts, n_shared): each initialisation (a row;
    '+keep' starts at the converted model's function) trained with softmax routing and the balance
    loss, every parameter, on the same budget (tokens, seqlen, batch, lr, min_lr, holdout); the
    dense model trained the same way."""
    task_files(data, "downcycle")
    shape = {k: v for k, v in layout.items() if k != "active"}  # experts and shared ones
    convert_specs = row_specs(rows, [layout["active"]], seed, load_config(demo_checkpoint())[0],
                              **shape)
    train_spec, path, calib = training_setup(data, "downcycle", calib_samples, calib_seqlen, seed,
                                       train=("all",), **budget)
    results = []
    with scratch("downcycle") as work:
        dense = trained(path, os.path.join(work, "dense"), train_spec(), val_windows, val_every,
                        "dense", val_seqlen)
        for row in rows:
            start = row.partition("+")[2]
            convert_spec = convert_specs[row, layout["active"]]
            moe = os.path.join(work, "moe")
            converted_into(path, moe, calib, convert_spec)
            downcycle_spec = train_spec(routing="softmax", balance=balance,
                                        keep_function=start == "keep")
            run = trained(moe, os.path.join(work, "trained"), downcycle_spec, val_windows,
                          val_every, row, val_seqlen)
            results.append({"row": row, **run})
    tasks = list(dense["before"])
    print(f"\nheld-out ppl ratio to the dense model trained the same way ({budget['tokens']} "
          f"tokens, every parameter), {layout['active']:.0%} of the FFN active, "
          f"{layout['n_experts']} experts, {layout['n_shared']} shared\n")
    table = [["dense", *(f"ppl {dense['after'][t]:.2f}" for t in tasks), "1.000",
              f"{dense['curve'][0][1]:.3f}", f"{dense['curve'][-1][1]:.3f}",
              f"{dense['tok_s']:.0f}", f"{dense['seconds']:.0f}"]]
    for r in results:
        table.append([f"`{r['row']}`", *ratio_cells(r["after"], dense["after"]),
                      f"{r['curve'][0][1]:.3f}", f"{r['curve'][-1][1]:.3f}",
                      f"{r['tok_s']:.0f} ({r['tok_s'] / dense['tok_s']:.2f})",
                      f"{r['seconds']:.0f}"])
    print_table(["init", *tasks, "geomean", "val loss at step 0", "val loss at the end",
                 "tok/s (x dense)", "train s"], table)
    print("\nvalidation loss (mean NLL over the tasks) by step\n")
    curves = [[str(step), *(f"{r['curve'][i][1]:.3f}" for r in results + [dense])]
              for i, (step, _) in enumerate(dense["curve"])]
    print_table(["step", *(f"`{r['row']}`" for r in results), "dense"], curves)
    if plot:
        title = f"the demo downcycled to {layout['active']:.0%} of its FFN: held-out loss"
        lines = [(r["row"], *zip(*r["curve"])) for r in results]
        lines.append(("dense (same training)", *zip(*dense["curve"])))
        draw(plot, lines, "optimizer step", "held-out loss (mean NLL over 4 tasks)", title)
    return [{"row": "dense", **dense}] + results


def domain_parts(tokenizer, files: dict[str, str], parts: int, holdout: float,
                 work: str) -> list[str]:
    """DIVE mines among many domains and the demo has four task files: each file's calibration part
    (never its held-out tail) cut into `parts` contiguous pieces, written as text, one domain each
    ('prose.1', 'prose.2', ...). -> FILE:TASK specs."""
    specs = []
    for task, file in files.items():
        head, _ = split_heldout(tokenizer.encode(read_text(file)).ids, holdout)
        size = len(head) // parts
        for i in range(parts):
            piece = os.path.join(work, f"{task}.{i + 1}.txt")
            with open(piece, "w") as f:
                f.write(tokenizer.decode(head[i * size: (i + 1) * size]))
            specs.append(f"{piece}:{task}.{i + 1}")
    return specs


def checkpoint_size(path: str) -> tuple[int, int]:
    """(FFN parameters, routers included; all parameters) of a checkpoint, whatever its dtype."""
    model = load_model(path)
    ffn = sum(p.numel() for b in model.layers for p in b.mlp.parameters())
    return ffn, sum(p.numel() for p in model.parameters())


def dive(data: str, rows: list[str], active: float, parts: int, budget: dict, stage0: float,
         temperature: float, calib_samples: int, calib_seqlen: int, val_windows: int, seed: int,
         val_seqlen: int = 512) -> list[dict]:
    """DIVE beside the default and CMoE at the same active FFN share, training-free and after the
    same budget: DIVE's two stages (a `stage0` share of the tokens for the router alone over every
    expert at `temperature`, then LoRA + router + norms), the others healed as in `heal`. Ratios
    to the dense model before, and to the dense model trained with LoRA on the budget after. DIVE
    mines among the task files cut into `parts` domains each."""
    if parts < 1 or not 0 < stage0 < 1 or temperature <= 0:
        raise ValueError(f"--parts {parts} must be at least 1, --stage0 {stage0} in (0, 1) and "
                         f"--temperature {temperature} positive")
    convert_specs = {row: s for (row, _), s in row_specs(rows, [active], seed).items()}
    for row, convert_spec in convert_specs.items():  # before any slow work
        if isinstance(convert_spec, DiveSpec):
            convert_spec.check_tasks(len(task_files(data, "dive")) * parts, mined=True,
                                     windows=calib_samples)
    train_spec, path, calib = training_setup(
        data, "dive", calib_samples, calib_seqlen, seed, **budget
    )
    results = []
    with scratch("dive") as work:
        tokenizer = load_tokenizer(path)
        pieces = domain_parts(tokenizer, task_files(data, "dive"), parts, budget["holdout"], work)
        domains = calibration_from_files(tokenizer, pieces, calib_samples, calib_seqlen, seed,
                                         holdout=0.0)
        dense = trained(path, os.path.join(work, "dense"), train_spec(train=("lora",)), val_windows,
                        10**9, "dense", val_seqlen)
        dense |= dict(zip(("ffn_params", "params"), checkpoint_size(path)))
        for row, convert_spec in convert_specs.items():
            moe, is_dive = os.path.join(work, "moe"), convert_spec.method == "dive"
            report = converted_into(path, moe, domains if is_dive else calib, convert_spec,
                                    log=lambda line: line.startswith("layer") or print(line))
            size = dict(zip(("ffn_params", "params"), checkpoint_size(moe)))
            if is_dive:
                run = dive_retrained(
                    moe, work, train_spec, budget, stage0, temperature, val_windows, row, val_seqlen
                )
                run["groups"] = report["dive"]["groups"]
            else:
                run = healed(
                    moe,
                    os.path.join(work, "healed"),
                    train_spec,
                    convert_spec,
                    val_windows,
                    row,
                    val_seqlen,
                )
            results.append({"row": row, **run, **size})
    tasks = list(dense["before"])
    print(f"\nheld-out ppl ratio to the dense model (before) and to the dense model trained with "
          f"LoRA on the same {budget['tokens']} tokens (after), {active:.0%} of the FFN active per "
          f"token; FFN and all parameters against the dense model's\n")
    table = [["dense", "1.00", f"{dense['params'] / 1e6:.1f}M", "1.000", "",
              *(f"ppl {dense['after'][t]:.2f}" for t in tasks), "1.000",
              f"{dense['seconds']:.0f}"]]
    for r in results:
        stage0 = ratio_cells(r["stage0"], dense["before"])[-1] if "stage0" in r else ""
        table.append([f"`{r['row']}`", f"{r['ffn_params'] / dense['ffn_params']:.2f}",
                      f"{r['params'] / 1e6:.1f}M ({r['params'] / dense['params']:.2f})",
                      ratio_cells(r["before"], dense["before"])[-1],
                      stage0, *ratio_cells(r["after"], dense["after"]), f"{r['seconds']:.0f}"])
    print_table(["row", "FFN params (x dense)", "parameters (x dense)", "before geomean",
                 "after stage 0 (router alone)", *(f"after {t}" for t in tasks), "after geomean",
                 "train s"], table)
    return [{"row": "dense", **dense}] + results

# -----------------------------------------------------------------------------
# export: the demo as a stock Qwen2-MoE checkpoint, run by transformers against our model



@torch.no_grad()
def export_bench(data: str, eps_values: list[float], calib_samples: int, calib_seqlen: int,
                 holdout: float, eval_windows: int, seed: int) -> list[dict]:
    """The demo converted with one allocation for every layer (45 shared experts, lsq without its
    bias), exported at each scale eps and loaded by transformers (float32): the largest logit
    difference, how often a layer selects other experts than ours would on the same input, held-out
    perplexity and the greedy continuation, against our model; then the same with softmax routing,
    which maps exactly."""
    import tempfile
    import transformers
    from train import set_routing
    transformers.logging.set_verbosity_error()
    files = task_files(data, "export")
    path = demo_checkpoint()
    tokenizer = load_tokenizer(path)
    calib = calibration_from_files(tokenizer, [f"{f}:{t}" for t, f in files.items()], calib_samples,
                                   calib_seqlen, seed, holdout)
    evals = {t: heldout_tokens(tokenizer, f, holdout)[: eval_windows * 512].view(-1, 512)
             for t, f in files.items()}
    prompt = torch.tensor([tokenizer.encode("The capital of France is").ids])
    print(header("cpu", "float32") + f", transformers {transformers.__version__}")
    work = tempfile.mkdtemp(prefix="expertweaver-export-")
    rows = []
    try:
        spec = ConvertSpec(n_experts=64, n_shared=45, router_bias=False, seed=seed)
        ours_path = os.path.join(work, "ours")
        converted_into(path, ours_path, calib, spec)
        ours = load_model(ours_path)
        softmax_path = os.path.join(work, "softmax")
        softmax = load_model(ours_path)
        set_routing(softmax, "softmax", norm_topk=True)
        hf_config = json.load(open(os.path.join(ours_path, "config.json")))
        save_checkpoint(softmax, hf_config, softmax_path, copy_from=ours_path)
        for routing, eps in [("sum", e) for e in eps_values] + [("softmax", None)]:
            source, model = (ours_path, ours) if routing == "sum" else (softmax_path, softmax)
            out = os.path.join(work, "hf")
            layout = export_qwen2_moe(source, out, torch.float32, log=lambda *_: None,
                                      eps=eps or EXPORT_EPS)
            hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            rows.append(compare_export(model, hf, evals, prompt) | {"routing": routing, "eps": eps,
                                                                     "layout": layout})
            r = rows[-1]
            scale = "-" if eps is None else f"2^{math.log2(eps):.0f}"
            print(f"{routing:>7} eps {scale}: max |logit diff| {r['max_logit_diff']:.2e}, "
                  f"selections swapped per layer {r['swapped']:.4%}, held-out ppl ours "
                  f"{r['ppl_ours']:.3f} export {r['ppl_export']:.3f}, greedy equal "
                  f"{r['greedy_equal']}, weight error any input "
                  f"{layout['weight_error_any_input']:.3g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def served(data: str, actives: list[float], fractions: list[float], calib_samples: int,
           calib_seqlen: int, select_samples: int, eval_seqlen: int, eval_windows: int,
           holdout: float, seed: int, tasks: tuple = (), task_limit: int | None = None,
           n_experts: int = 128) -> list[dict]:
    """The configuration a user serves in transformers or vLLM: one allocation for every layer
    (--n-shared N), lsq without its bias, exported as Qwen2-MoE. At each active fraction N is swept
    (each fraction of the k active experts) and chosen by perplexity on selection windows from the
    calibration side of each file (drawn with another seed, none of them profiled); the choice is
    then measured on the held-out text and the tasks, as our model runs it and as transformers
    runs its export."""
    import tempfile
    files = task_files(data, "served")
    eval_dir = check_tasks(data, tasks)
    if select_samples < 1:
        raise ValueError(f"--select-samples {select_samples} must be at least 1")
    path = demo_checkpoint()
    cfg, hf_config = load_config(path)
    specs = {a: ConvertSpec(n_experts=n_experts, active=a, router_bias=False, seed=seed)
             for a in actives}
    for spec in specs.values():
        spec.check_layers(cfg.ffn_dim, cfg.n_layers, cfg.dim)
    grids = {a: sorted({min(max(round(f * s.k), 0), s.k - 1) for f in fractions})
             for a, s in specs.items()}
    tokenizer = load_tokenizer(path)
    entries = [f"{f}:{task}" for task, f in files.items()]
    calib = calibration_from_files(tokenizer, entries, calib_samples, calib_seqlen, seed, holdout)
    select = calibration_from_files(tokenizer, entries, select_samples, calib_seqlen, seed + 1,
                                    holdout)
    profiled = {tuple(w.tolist()) for w in calib.tokens}
    unprofiled = [w for w in select.tokens if tuple(w.tolist()) not in profiled]
    if not unprofiled:
        raise ValueError(f"every one of the --select-samples {select_samples} windows per task was "
                         f"profiled: give more text or raise --select-samples")
    select_tokens = torch.stack(unprofiled)
    evals = {task: heldout_tokens(tokenizer, f, holdout) for task, f in files.items()}
    print(f"selection: {len(select_tokens)} windows x {calib_seqlen} tokens from the calibration "
          f"side, none profiled; evaluation: held-out last {holdout:.0%} of each file, "
          f"{eval_windows} windows x {eval_seqlen} tokens per task")
    measure = lambda model: (
        {t: perplexity(model, x, eval_seqlen, eval_windows)[1] for t, x in evals.items()},
        score_tasks(model, tokenizer, eval_dir, tasks, task_limit) if tasks else {})
    dense, dense_acc = measure(load_model(path))
    results, work = [], tempfile.mkdtemp(prefix="expertweaver-served-")
    try:
        for active, spec in specs.items():
            sweep, n, best = {}, None, None
            for shared in grids[active]:
                model = load_model(path)
                convert_model(model, calib, replace(spec, n_shared=shared), log=lambda *_: None)
                sweep[shared] = perplexity(model, select_tokens.flatten(), calib_seqlen)[1]
                print(f"active {active:.2f} --n-shared {shared:>2} (routed top-k "
                      f"{spec.k - shared:>2}): selection ppl {sweep[shared]:.3f}", flush=True)
                if n is None or sweep[shared] < sweep[n]:
                    n, best = shared, model
            ours_path, hf_path = os.path.join(work, "ours"), os.path.join(work, "hf")
            save_checkpoint(best, hf_config, ours_path, copy_from=path)
            export_qwen2_moe(ours_path, hf_path, torch.float32, log=lambda *_: None)
            for name in ("ours", "export"):
                model = best if name == "ours" else Served(hf_path)
                ppl, acc = measure(model)
                ratios = {t: ppl[t] / dense[t] for t in ppl}
                results.append({"row": f"served:n_shared={n} ({name})", "active": active,
                                "n_shared": n, "runs": name, "sweep": sweep, "ppl": ppl,
                                "ratio": ratios, "geomean": geomean(ratios.values()),
                                **({"tasks": acc} if tasks else {})})
                print(f"active {active:.2f} --n-shared {n} run by {name}: held-out geomean "
                      f"x{results[-1]['geomean']:.3f}", flush=True)
            del best, model
            for checkpoint in (ours_path, hf_path):  # the next fraction's go in their place
                shutil.rmtree(checkpoint)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\nheld-out ppl ratio to dense, the chosen --n-shared\n")
    print_table(["row", "active", *evals, "geomean"],
                [[r["row"], f"{r['active']:.2f}", *(f"{r['ratio'][t]:.3f}" for t in evals),
                  f"**{r['geomean']:.3f}**"] for r in results])
    if tasks:
        print_accuracy_table(results, dense_acc)
    return [{"row": "dense", "ppl": dense, **({"tasks": dense_acc} if tasks else {})}] + results


UNTRAINED = {"tokens": 0, "seqlen": 1, "batch": 1}  # training_setup's budget when none is trained


def hierarchy(data: str, outer: str, outer_active: float, sub_experts: int, inner: list[float],
              calib_samples: int, calib_seqlen: int, eval_seqlen: int, eval_windows: int,
              holdout: float, seed: int, one_level: str = "expertweaver",
              budget: dict | None = None, balance: float = 0.01, val_windows: int = 4,
              val_every: int = 16, routing: str = "scaled",
              dense_path: str | None = None, save_outer: str | None = None,
              tasks: tuple = (), task_limit: int | None = None) -> list[dict]:
    """Is a hierarchy better than one level at equal compute? The demo converted by the row
    `outer` at outer_active into an MoE with large experts. Without a training budget, that MoE is
    exported as a stock Qwen2-MoE and read back as one (model.py's HF MoE path); with one, it is
    downcycled (every parameter, the balance loss, starting at the converted function; routing
    `scaled`, or Mixtral's softmax renormalised over the top-k) and kept in our format. Its experts
    (and shared expert) are then split again at each inner fraction (recursive.py: sub_experts
    each, half of the active ones shared, lsq), beside the dense demo converted in one level (the
    row one_level) to the same share of FFN neurons. Held-out ppl against the dense model's and the
    outer MoE's, and the FFN FLOPs per token. `outer` may instead be an MoE checkpoint of the demo
    (e.g. one trained before), and dense_path a checkpoint of the demo's shape (e.g. the demo
    trained alike) that is the reference and is converted in one level. With tasks, every row's
    zero-shot accuracy too, against the reference's."""
    if save_outer and os.path.exists(save_outer):
        raise ValueError(f"--save-outer {save_outer} exists: give a new directory")
    if save_outer and os.path.isdir(outer):
        raise ValueError(f"--save-outer keeps the outer MoE this run makes; --outer {outer} is a "
                         f"checkpoint already")
    files = task_files(data, "hierarchy")
    eval_dir = check_tasks(data, tasks)
    make_train_spec, path, calib = training_setup(data, "hierarchy", calib_samples, calib_seqlen,
                                                  seed, holdout=holdout,
                                                  **(budget or UNTRAINED))
    demo, path = path, dense_path or path
    cfg = load_config(path)[0]
    outer_dir = outer if os.path.isdir(outer) else None
    if outer_dir and (load_config(outer_dir)[0].moe is None or budget):
        raise ValueError(f"--outer {outer}: a directory must hold an MoE checkpoint, which is "
                         f"split as it is (without --tokens)")
    outer_spec = None if outer_dir else \
        row_specs([outer], [outer_active], seed, cfg)[outer, outer_active]
    row_specs([one_level], [outer_active], seed, cfg)  # refused now, not after the slow part
    problems = [] if outer_dir else export_problems(cfg, outer_spec)
    if problems and not budget:
        raise ValueError(f"--outer {outer}: not exportable as Qwen2-MoE: " + "; ".join(problems))
    tokenizer = load_tokenizer(path)
    evals = {task: heldout_tokens(tokenizer, f, holdout) for task, f in files.items()}
    ppl_of = lambda model: {task: perplexity(model, tokens, eval_seqlen, eval_windows)[1]
                            for task, tokens in evals.items()}
    score = lambda model: score_tasks(model, tokenizer, eval_dir, tasks, task_limit) if tasks \
        else {}
    with torch.no_grad():
        dense_model = load_model(path)
        dense, dense_acc = ppl_of(dense_model), score(dense_model)
        del dense_model
    rows = []

    def add(label: str, model, seconds: float, outer_ppl: dict | None = None) -> dict:
        ppl, flops = ppl_of(model), ffn_flops(model.cfg)
        ratios = {t: ppl[t] / dense[t] for t in ppl}
        row = {"row": label, "ppl": ppl, "geomean": geomean(ratios.values()),
               "ffn_share": flops["experts"] / flops["dense"],
               "flops_share": (flops["experts"] + flops["router"]) / flops["dense"],
               "vs_outer": None if outer_ppl is None else
               geomean(ppl[t] / outer_ppl[t] for t in ppl), "convert_seconds": seconds,
               "tasks": score(model)}
        row["active"] = row["ffn_share"]  # print_accuracy_table's column
        rows.append(row)
        print(f"{label}: FFN neurons {row['ffn_share']:.1%} (FLOPs with routers "
              f"{row['flops_share']:.1%}), geomean ppl ratio x{row['geomean']:.3f}"
              + ("" if outer_ppl is None else f", over the outer MoE x{row['vs_outer']:.3f}")
              + f" ({seconds:.0f}s)", flush=True)
        return row
    with scratch("hierarchy") as work, torch.no_grad():
        t0 = time.time()
        if not outer_dir:
            converted_into(demo, os.path.join(work, "ours"), calib, outer_spec)
        if outer_dir:
            label, run = f"outer: {outer}", None
        elif budget:
            with torch.enable_grad():
                run = trained(os.path.join(work, "ours"), os.path.join(work, "outer"),
                              make_train_spec(train=("all",), routing=routing, balance=balance,
                                              norm_topk=routing == "softmax",
                                              keep_function=routing == "softmax"),
                              val_windows, val_every, "outer")
            label = f"outer: {outer} at {outer_active}, downcycled ({routing}) on " \
                f"{budget['tokens']} tokens"
        else:
            export_qwen2_moe(os.path.join(work, "ours"), os.path.join(work, "outer"),
                             torch.float32, log=lambda *_: None)
            label, run = f"outer: {outer} at {outer_active}, as Qwen2-MoE", None
        stock = outer_dir or os.path.join(work, "outer")
        outer_row = add(label, load_model(stock), time.time() - t0)
        if save_outer:  # e.g. to split it again with --outer DIR
            shutil.copytree(stock, save_outer)
        if run:
            outer_row["curve"] = run["curve"]
        for fraction in inner:
            model = load_model(stock)
            t0 = time.time()
            convert_model(model, calib, ConvertSpec(n_experts=sub_experts, active=fraction,
                                                    seed=seed), log=lambda *_: None)
            split = add(f"its experts split, {fraction} of each active", model,
                        time.time() - t0, outer_row["ppl"])
            model = load_model(path)
            t0 = time.time()
            spec = row_specs([one_level], [split["ffn_share"]], seed, cfg)
            convert_model(model, calib, next(iter(spec.values())), log=lambda *_: None)
            add(f"the dense model in one level, {one_level} at {split['ffn_share']:.3f}", model,
                time.time() - t0, outer_row["ppl"])
    tasks = list(dense)
    print_table(["row", "FFN neurons used", "FFN FLOPs with routers",
                 *(f"{t} ppl ratio" for t in tasks), "geomean", "over the outer MoE",
                 "convert s"],
                [["dense", "100%", "100%", *(f"ppl {dense[t]:.2f}" for t in tasks), "1.000", "",
                  ""]] +
                [[r["row"], f"{r['ffn_share']:.1%}", f"{r['flops_share']:.1%}",
                  *(f"{r['ppl'][t] / dense[t]:.3f}" for t in tasks), f"**{r['geomean']:.3f}**",
                  "" if r["vs_outer"] is None else f"{r['vs_outer']:.3f}",
                  f"{r['convert_seconds']:.0f}"] for r in rows])
    if tasks:
        print_accuracy_table(rows, dense_acc)
    if budget:
        print("\nthe outer MoE's downcycling: validation loss (mean NLL over the tasks) by step\n")
        print_table(["step", *(str(step) for step, _ in run["curve"])],
                    [["val loss", *(f"{nll:.3f}" for _, nll in run["curve"])]])
    return [{"row": "dense", "ppl": dense, "tasks": dense_acc}] + rows


def compare_export(ours, hf, evals: dict, prompt: torch.Tensor) -> dict:
    """Our model against transformers' on the same held-out windows: logits, selections, ppl."""
    picks = {}
    for i, layer in enumerate(hf.model.layers):  # the export's selections, and its layers' inputs
        layer.mlp.gate.register_forward_hook(
            lambda m, args, out, i=i: picks.setdefault(i, []).append((args[0], out[2])))
    diff, swapped, nll = 0.0, [], {"ours": 0.0, "export": 0.0}
    for windows in evals.values():
        for w in windows:
            a, b = ours(w[None]).float(), hf(w[None]).logits.float()
            diff = max(diff, (a - b).abs().max().item())
            for name, logits in (("ours", a), ("export", b)):
                nll[name] += F.cross_entropy(logits[0, :-1], w[1:]).item()
    n = sum(len(w) for w in evals.values())
    for i, calls in picks.items():
        moe = ours.layers[i].mlp
        mine = [(moe.route(x.reshape(-1, x.shape[-1]))[0].sort(1).values, idx.sort(1).values)
                for x, idx in calls]
        differ = sum((a != b).any(1).sum().item() for a, b in mine)
        swapped.append(differ / sum(len(a) for a, _ in mine))
    greedy = torch.equal(ours.generate(prompt, 16), hf.generate(prompt, max_new_tokens=16,
                                                                do_sample=False))
    return {"max_logit_diff": diff, "swapped": sum(swapped) / len(swapped),
            "ppl_ours": math.exp(nll["ours"] / n), "ppl_export": math.exp(nll["export"] / n),
            "greedy_equal": greedy}


def data_flags(parser, holdout: str, seed: str) -> None:
    """The text flags every conversion or training command takes: where the tasks' files are, how
    they are sampled for calibration, and the held-out tail."""
    files = ", ".join(TASK_FILES.values())
    parser.add_argument("--data", default=DATA, help=f"directory holding {files}")
    parser.add_argument("--calib-samples", type=int, default=8,
                        help="calibration windows per task")
    parser.add_argument("--calib-seqlen", type=int, default=256,
                        help="tokens per calibration window")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help=f"the last fraction of each file: {holdout}, never trained or "
                        "calibrated on")
    parser.add_argument("--seed", type=int, default=0, help=seed)


def run_command(a) -> list[dict]:
    """The subcommand parsed into `a`, run; -> its rows."""
    if a.command == "plot":
        return replot(a.files, a.out, a.rows)
    text = dict(data=a.data, calib_samples=a.calib_samples, calib_seqlen=a.calib_seqlen,
                seed=a.seed)
    if a.command == "quality":
        torch.set_grad_enabled(False)
        return quality(**text, rows=a.rows, actives=a.active, eval_seqlen=a.eval_seqlen,
                       eval_windows=a.eval_windows, holdout=a.holdout, plot=a.plot,
                       plot_rows=a.plot_rows, tasks=tuple(a.tasks), task_limit=a.task_limit,
                       model_name=a.model)
    if a.command == "served":
        torch.set_grad_enabled(False)
        return served(**text, actives=a.active, fractions=a.shared_fractions,
                      select_samples=a.select_samples, n_experts=a.experts,
                      eval_seqlen=a.eval_seqlen, eval_windows=a.eval_windows, holdout=a.holdout,
                      tasks=tuple(a.tasks), task_limit=a.task_limit)
    if a.command == "hierarchy":
        budget = dict(tokens=a.tokens, seqlen=a.seqlen, batch=a.batch, lr=a.lr,
                      min_lr=a.lr / 10) if a.tokens else None
        return hierarchy(**text, outer=a.outer, outer_active=a.outer_active,
                         sub_experts=a.sub_experts, inner=a.inner, one_level=a.one_level,
                         eval_seqlen=a.eval_seqlen, eval_windows=a.eval_windows,
                         holdout=a.holdout, budget=budget, balance=a.balance,
                         val_windows=a.val_windows, val_every=a.val_every, routing=a.routing,
                         dense_path=a.dense, save_outer=a.save_outer, tasks=tuple(a.tasks),
                         task_limit=a.task_limit)
    if a.command == "export":
        torch.set_grad_enabled(False)
        return export_bench(**text, eps_values=a.eps, holdout=a.holdout,
                            eval_windows=a.eval_windows)
    budget = dict(tokens=a.tokens, seqlen=a.seqlen, batch=a.batch, lr=a.lr, holdout=a.holdout)
    text["val_windows"] = a.val_windows
    if a.command == "dive":
        return dive(**text, rows=a.rows, active=a.active, parts=a.parts, budget=budget,
                    stage0=a.stage0, temperature=a.temperature)
    if a.command == "heal":
        return heal(**text, rows=a.rows, actives=a.active, budget=budget, model_name=a.model)
    layout = dict(active=a.active, n_experts=a.experts, n_shared=a.n_shared)
    return downcycle(**text, rows=a.rows, layout=layout, budget={**budget, "min_lr": a.min_lr},
                     balance=a.balance, val_every=a.val_every, plot=a.plot)


if __name__ == "__main__":
    import argparse

    from flags import HelpFormatter

    defaults = HelpFormatter
    p = argparse.ArgumentParser(description="The RESULTS.md experiments: conversion quality, "
                                "healing, downcycling, DIVE and the export, each against the dense "
                                "model in the same run.", formatter_class=defaults)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="held-out ppl ratio MoE / dense for conversions x active "
                       "fractions", formatter_class=defaults)
    q.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                   help="conversions, each 'method[:router][:key=value...]' with ConvertSpec keys, "
                   "e.g. expertweaver:lsq:tau=0.3; a method alone takes its own router")
    q.add_argument("--active", nargs="+", type=float, default=[0.9, 0.75, 0.5],
                   help="active fractions")
    q.add_argument("--plot", default=None,
                   help="draw the geomean ppl ratio against the FFN FLOPs used, a line per row, "
                   "into this PNG (needs matplotlib)")
    q.add_argument("--plot-rows", nargs="+", default=None, help="the rows drawn (default: all)")
    pl = sub.add_parser("plot", help="quality's picture again from the --json of quality runs "
                        "(merged), without converting", formatter_class=defaults)
    pl.add_argument("files", nargs="+", help="--json files written by quality runs on one model")
    pl.add_argument("--out", required=True, help="the PNG to write (needs matplotlib)")
    pl.add_argument("--rows", nargs="+", default=None,
                    help="the rows drawn, in this order (default: every row, as saved)")
    sv = sub.add_parser("served", help="the exportable configuration (one --n-shared for every "
                        "layer, lsq without bias): N chosen on the calibration side, then its "
                        "export run by transformers", formatter_class=defaults)
    sv.add_argument("--active", nargs="+", type=float, default=[0.9, 0.75, 0.5],
                    help="active fractions")
    sv.add_argument("--experts", type=int, default=128, help="experts per layer, shared included")
    sv.add_argument("--shared-fractions", nargs="+", type=float,
                    default=[0.25, 0.5, 0.625, 0.75, 0.875, 0.95],
                    help="the --n-shared values tried, as fractions of the k active experts")
    sv.add_argument("--select-samples", type=int, default=8,
                    help="selection windows per task, from the calibration side (profiled ones "
                    "dropped)")
    for s in (q, sv):
        s.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
        s.add_argument("--eval-windows", type=int, default=8, help="held-out windows per task")
        data_flags(s, "evaluated", "calibration windows and k-means")
    eb = sub.add_parser("export", help="the demo exported as Qwen2-MoE, run by transformers "
                        "against our model", formatter_class=defaults)
    eb.add_argument("--eps", nargs="+", type=float, default=[2.0 ** -12, 2.0 ** -10, 2.0 ** -8],
                    help="sum routing: the scales to export at")
    eb.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 512 per task")
    data_flags(eb, "evaluated", "calibration windows and k-means")
    rb = sub.add_parser("hierarchy", help="an MoE's experts split again (recursive.py) against "
                        "the dense model converted in one level to the same FFN FLOPs",
                        formatter_class=defaults)
    rb.add_argument("--outer", default="expertweaver:n_experts=16:n_shared=4",
                    help="the MoE with large experts, as a quality row (exportable as Qwen2-MoE), "
                    "or an MoE checkpoint directory of the demo to split as it is")
    rb.add_argument("--save-outer", default=None,
                    help="also keep the outer MoE (converted, or trained with --tokens) in this "
                    "new directory")
    rb.add_argument("--dense", default=None,
                    help="a dense checkpoint of the demo's shape (e.g. the demo trained as the "
                    "outer MoE was) that is the reference and is converted in one level "
                    "(default: the demo)")
    rb.add_argument("--outer-active", type=float, default=0.5,
                    help="its active fraction of the dense FFN")
    rb.add_argument("--sub-experts", type=int, default=8,
                    help="sub-experts each expert (and the shared expert) is split into")
    rb.add_argument("--inner", nargs="+", type=float, default=[0.75, 0.5],
                    help="active fractions of each expert's neurons")
    rb.add_argument("--one-level", default="expertweaver",
                    help="the conversion of the dense model at the same FFN share, as a quality "
                    "row")
    rb.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    rb.add_argument("--eval-windows", type=int, default=8, help="held-out windows per task")
    data_flags(rb, "evaluated", "calibration windows and k-means")
    rb.add_argument("--tokens", type=int, default=0,
                    help="downcycle the outer MoE on this many training tokens first (every "
                    "parameter, the balance loss, started at the converted function); 0: split it "
                    "untrained, as Qwen2-MoE")
    rb.add_argument("--routing", default="scaled", choices=["scaled", "softmax"],
                    help="--tokens: the routing trained. scaled: 1 + gamma p, gamma = 0 at the "
                    "start; softmax: Mixtral's, renormalised over the top-k (train.py "
                    "--keep-function; its shrunken router diverged here, RESULTS.md)")
    rb.add_argument("--seqlen", type=int, default=256, help="--tokens: tokens per training window")
    rb.add_argument("--batch", type=int, default=8, help="--tokens: windows per optimizer step")
    rb.add_argument("--lr", type=float, default=4e-4,
                    help="--tokens: peak learning rate (warm-up, cosine to a tenth)")
    rb.add_argument("--balance", type=float, default=0.01,
                    help="--tokens: Switch balance loss coefficient")
    rb.add_argument("--val-windows", type=int, default=4,
                    help="--tokens: held-out windows of 512 tokens per task while training")
    rb.add_argument("--val-every", type=int, default=16, help="--tokens: steps between validations")
    for s in (q, sv, rb):
        s.add_argument("--tasks", nargs="*", default=[], choices=list(TASKS),
                       help="also score zero-shot accuracy on these tasks (files in DATA/eval)")
        s.add_argument("--task-limit", type=int, default=None,
                       help="score the first this many items of each task (default: all)")
    hb = sub.add_parser("heal", help="conversions healed with LoRA + router vs the dense model "
                        "trained alike", formatter_class=defaults)
    hb.add_argument("--rows", nargs="+", help="conversions, as in quality",
                    default=["expertweaver", PAPER, "cmoe", "static"])
    hb.add_argument("--active", nargs="+", type=float, default=[0.75, 0.5], help="active fractions")
    hb.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up, cosine)")
    for s in (q, hb):
        s.add_argument("--model", default="demo", choices=list(DEMOS),
                       help="the demo converted: SmolLM2-135M (demo) or Gemma 3 270M (demo-gemma)")
    db = sub.add_parser("downcycle", help="initialisations of a sparser MoE trained alike (every "
                        "parameter)", formatter_class=defaults)
    db.add_argument("--rows", nargs="+",
                    default=["expertweaver:centroid", "random:centroid", "cmoe",
                             "expertweaver:centroid+keep"],
                    help="initialisations, as quality's rows; +keep: start at the converted "
                    "model's function")
    db.add_argument("--active", type=float, default=0.25, help="active fraction of the sparser MoE")
    db.add_argument("--experts", type=int, default=64, help="experts per layer, shared included")
    db.add_argument("--n-shared", type=int, default=2, help="shared experts in every layer")
    db.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (warm-up, cosine)")
    db.add_argument("--min-lr", type=float, default=4e-5, help="learning rate at the end")
    db.add_argument("--balance", type=float, default=0.01, help="Switch balance loss coefficient")
    db.add_argument("--val-every", type=int, default=4, help="steps between validations")
    db.add_argument("--plot", default=None,
                    help="draw the validation curves into this PNG (needs matplotlib)")
    vb = sub.add_parser("dive", help="DIVE, the default and CMoE at the same active share, before "
                        "and after the same retraining", formatter_class=defaults)
    vb.add_argument("--rows", nargs="+", default=["dive", "dive:random", "expertweaver", "cmoe"],
                    help="conversions, as in quality (dive: lsq router; dive:random: DIVE's "
                    "random one; dive:dive_groups=G)")
    vb.add_argument("--active", type=float, default=0.5, help="active fraction of the FFN")
    vb.add_argument("--parts", type=int, default=2,
                    help="DIVE's domains: each task file's calibration part cut into this many")
    vb.add_argument("--stage0", type=float, default=0.25,
                    help="DIVE: share of the tokens for stage 0 (the router alone)")
    vb.add_argument("--temperature", type=float, default=0.05,
                    help="DIVE stage 0: softmax temperature over every expert (DIVE's 5e-2)")
    vb.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up, cosine)")
    for s in (hb, db, vb):
        s.add_argument("--tokens", type=int, default=65536, help="training tokens per run")
        s.add_argument("--seqlen", type=int, default=256, help="tokens per training window")
        s.add_argument("--batch", type=int, default=8, help="windows per optimizer step")
        data_flags(s, "validation", "data order, LoRA init, k-means")
        s.add_argument("--val-windows", type=int, default=8,
                       help="held-out windows of 512 tokens per task")
    run_cli(p, run_command, "experiments.py")
