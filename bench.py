"""
bench.py: what a conversion costs in quality and buys in speed, each against the dense model in
the same run.

    python bench.py ppl CHECKPOINT FILE --seqlen 1024   # perplexity of a checkpoint on a text file
    python bench.py quality                  # held-out ppl ratio, every method x active fraction
    python bench.py quality --rows expertweaver:lsq:tau=0.3 --active 0.75      # an ablation
    python bench.py heal                     # conversions healed with LoRA vs dense trained alike
    python bench.py downcycle                # initialisations of a sparser MoE trained alike
    python bench.py ffn --breakdown          # one FFN layer, dense vs MoE; where the time goes
    python bench.py model                    # the demo model: prefill and decode tokens/s
    python bench.py convert llama3-8b        # stream-convert a synthetic 8B checkpoint: time, RSS
    python bench.py partition llama3-8b      # partition + router of one 8B layer

Imports model.py, kernels.py, weaver.py and convert.py (calibration, the drivers, perplexity).

ppl: the GPTQ / CMoE protocol (convert.perplexity) on a .txt file or the --field(s) of a .jsonl
file.

quality: calibrates once on the files in --data (default ../shared/data: prose, dialogue, math,
code), converts the demo model with every row (a method, its router and settings) x active fraction,
and reports held-out perplexity as a ratio to the dense model's on the same windows: the last 10% of
each file, which calibration never reads. Also the FFN FLOPs used per token, router included, and
the share of the centroid -> oracle gap each router closes.

ffn: random weights at the FFN shapes of the demo model, LLaMA-3-8B and Qwen2.5-7B, N_e experts,
half of the active ones shared (CMoE's S = A split), routed by a centroid router on random inputs
("router") or by a forced round-robin ("balanced"). Times are medians after warm-up, dense and MoE
calls alternating; the MoE time includes the router. ideal = the roofline ratio, cost = max(bytes /
bandwidth, FLOPs / rate) with the bandwidth and FLOP rate this machine's dense FFN reaches at the
smallest and largest T, the bytes being those of the experts the tokens touch; efficiency = speedup
/ ideal.

model: the demo model dense and converted (ExpertWeaver), prefill tokens/s at T = 1024 and batch-1
decode tokens/s over 128 new tokens, eager and torch.compile'd.
"""
import itertools
import json
import math
import os
import platform
import shutil
import sys
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from convert import (Calibration, calibration_from_files, calibration_from_model, convert,
                     convert_checkpoint, demo_checkpoint, exit_on_sigterm, heldout_tokens,
                     output_dir, peak_rss_gib, perplexity, read_text, resolve, split_heldout)
from model import (MLP, Block, CheckpointWriter, ModelConfig, check_device, load_config,
                   load_model, load_tokenizer, save_checkpoint)
from weaver import (ConvertSpec, build_moe, check_dive_assign, check_layers, fit_router,
                    plan_expertweaver, profile_layer)

SHAPES = {"demo": (576, 1536), "llama3-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944)}  # (D, d_ff)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
TASK_FILES = {"prose": "wikitext2-valid.txt", "dialogue": "tinyshakespeare.txt",
              "math": "gsm8k-train.jsonl", "code": "code-pytorch-examples.py.txt"}

# -----------------------------------------------------------------------------
# timing


def header(device: str, dtype: str) -> str:
    name = platform.processor() or platform.machine()
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    if device == "cpu":
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), name)
    return (f"device {device} ({name}), dtype {dtype}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def measure(fns: list, device: str, min_time: float = 1.0, max_runs: int = 200) -> list[float]:
    """Median seconds per call of each function, after warm-up. The functions take turns, run by
    run, so a machine whose speed drifts slows them alike and their ratio holds. CUDA is timed with
    events."""
    for fn in fns:
        for _ in range(3):
            fn()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    times = [[] for _ in fns]
    start = time.perf_counter()
    more = lambda: time.perf_counter() - start < min_time * len(fns) and len(times[0]) < max_runs
    while len(times[0]) < 5 or more():
        for fn, t in zip(fns, times):
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                t.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def print_table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def draw(file: str, lines: list[tuple], xlabel: str, ylabel: str, title: str) -> None:
    """One line per (label, xs, ys), into a PNG. matplotlib is optional, imported here only."""
    try:
        import matplotlib
    except ImportError:
        print(f"no picture: matplotlib is not installed (pip install matplotlib); {file} not "
              f"written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    print(f"wrote {file}")

# -----------------------------------------------------------------------------
# ppl: one checkpoint on one file


def ppl(checkpoint: str, file: str, field: str | None, seqlen: int, max_windows: int | None,
        dtype: str, device: str) -> dict:
    if seqlen < 2:
        raise ValueError(f"--seqlen {seqlen} must be at least 2")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows {max_windows} must be at least 1")
    path = resolve(checkpoint)
    ids = load_tokenizer(path).encode(read_text(file, field)).ids
    if len(ids) < seqlen:
        raise ValueError(f"{file}: {len(ids)} tokens make no window of --seqlen {seqlen}")
    tokens = torch.tensor(ids, dtype=torch.int64)
    t0 = time.time()
    model = load_model(path, getattr(torch, dtype), device)
    nll, value, n = perplexity(model, tokens, seqlen, max_windows)
    print(f"{file}: {tokens.numel()} tokens, {n} windows of {seqlen}: nll {nll:.4f} ppl "
          f"{value:.3f} ({time.time() - t0:.1f}s)")
    return {"checkpoint": path, "file": file, "nll": nll, "ppl": value, "windows": n,
            "seqlen": seqlen}

# -----------------------------------------------------------------------------
# ffn: one FFN layer, dense vs MoE


def moe_layer_weights(w13: torch.Tensor, w2: torch.Tensor, n_experts: int, active: float):
    """Dense GLU weights w13 (2 d_ff, D) = gate then up, w2 (D, d_ff) -> the MoE layout: the first S
    neurons shared, the rest in equal experts, and a centroid router. Returns (shared, e13, e2,
    router, top_k)."""
    d_ff = w2.shape[1]
    k = round(active * n_experts)
    n_shared = k // 2
    d_e = d_ff // n_experts
    S, E = n_shared * d_e, n_experts - n_shared
    gate, up = w13[:d_ff], w13[d_ff:]
    shared = (gate[:S], up[:S], w2[:, :S].contiguous()) if S else None
    e13 = torch.cat([gate[S:].view(E, d_e, -1), up[S:].view(E, d_e, -1)], dim=1)  # (E, 2F, D)
    e2 = w2[:, S:].T.reshape(E, d_e, -1).contiguous()  # (E, F, D)
    router = gate[S:].view(E, d_e, -1).float().mean(dim=1)  # (E, D)
    return shared, e13, e2, router, k - n_shared


def grouped_gemms(x, idx, w13, w2):
    """Only the two grouped GEMMs of kernels.grouped, on token-slots already sorted by expert: what
    the grouped path would cost with free routing bookkeeping (sort, gather, un-permute, sum)."""
    order, offsets = kernels.sort_by_expert(idx, w13.shape[0])
    xs = x[order // idx.shape[1]]

    def run():
        gate, up = F.grouped_mm(xs, w13.transpose(-2, -1), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, w2, offs=offsets)
    return run


def ffn_parts(x, route, e13, e2, shared, path, device, min_time) -> dict:
    """Where an MoE call's time goes, each part timed alone (eager): the router (scores + top-k),
    the shared GLU, the routed experts (for `grouped`: its two GEMMs alone, the rest being
    permutation)."""
    idx = route(x)
    parts = {"router": lambda: route(x), "shared": lambda: kernels.shared_glu(x, shared),
             "experts": lambda: kernels.moe_ffn(x, idx, e13, e2, None, path=path)}
    if path == "grouped":
        parts["gemms"] = grouped_gemms(x, idx, e13, e2)
    return dict(zip(parts, (t * 1e3 for t in measure(list(parts.values()), device, min_time))))


def ffn_bench(device: str, dtype: str, shapes: list[str], actives: list[float], tokens: list[int],
              routings: list[str], n_experts: int, compile: bool, min_time: float,
              breakdown: bool = False) -> list[dict]:
    """Rows of dense vs MoE FFN time. The ideal speedup is a roofline ratio: cost = max(bytes /
    bandwidth, FLOPs / FLOP rate), with this machine's bandwidth read off the dense FFN at the
    smallest T and its FLOP rate off the dense FFN at the largest T, so it follows whichever bound
    binds at each T. `breakdown` also times the MoE call's parts (ffn_parts)."""
    print(header(device, dtype))
    dt = getattr(torch, dtype)
    rows = []
    print(f"{'shape':>11} {'f':>5} {'T':>5} {'routing':>8} {'path':>8} {'dense ms':>9} "
          f"{'moe ms':>9} {'speedup':>8} {'ideal':>6} {'eff':>5} {'achieved':>14}")
    for shape in shapes:
        D, d_ff = SHAPES[shape]
        g = torch.Generator(device=device).manual_seed(0)
        w13 = (torch.randn(2 * d_ff, D, generator=g, device=device) / D ** 0.5).to(dt)
        w2 = (torch.randn(D, d_ff, generator=g, device=device) / d_ff ** 0.5).to(dt)
        shape_rows = []
        for active in actives:
            layer = moe_layer_weights(w13, w2, n_experts, active)
            for T in tokens:
                x = torch.randn(T, D, generator=g, device=device).to(dt)
                for routing in routings:
                    row = ffn_row(x, w13, w2, layer, routing, compile, min_time, breakdown)
                    shape_rows.append({"shape": shape, "active": active, **row})
        add_roofline(shape_rows, tokens)
        for r in shape_rows:
            print_ffn_row(r)
        rows += shape_rows
    return rows


def ffn_row(x, w13, w2, layer, routing: str, compile: bool, min_time: float,
            breakdown: bool) -> dict:
    """One measurement: the dense FFN and the MoE on the same tokens x (T, D). routing "balanced":
    a large bias on round-robin experts forces the choice, the router still run."""
    shared, e13, e2, router, top_k = layer
    (T, D), (E, F2, _), device = x.shape, e13.shape, x.device
    d_ff, d_e, S = w2.shape[1], F2 // 2, 0 if shared is None else shared[0].shape[0]
    bias = torch.zeros(T, E, device=device)
    if routing == "balanced":
        bias.scatter_(1, (torch.arange(T * top_k, device=device) % E).view(T, top_k), 1e9)

    def dense(x):
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def route(x):
        return (x.float() @ router.T + bias).topk(top_k, dim=-1).indices  # (T, K)

    def moe(x, path):
        return kernels.moe_ffn(x, route(x), e13, e2, shared, path=path)
    path = kernels.choose_path(device.type, x.dtype, T, top_k, E, D, d_e, compile)
    compiled = compile and path != "select"
    run = torch.compile(moe, fullgraph=True, dynamic=False) if compiled else moe
    with torch.no_grad():
        t_dense, t_moe = measure([lambda: dense(x), lambda: run(x, path)], str(device), min_time)
        touched = len(route(x).unique())  # experts whose weights the step must read
        parts = {}
        if breakdown:
            parts = ffn_parts(x, route, e13, e2, shared, path, str(device), min_time)
    size = torch.finfo(x.dtype).bits // 8
    return {"D": D, "d_ff": d_ff, "T": T, "routing": routing, "path": path, "compiled": compiled,
            "dense_ms": t_dense * 1e3, "moe_ms": t_moe * 1e3, "speedup": t_dense / t_moe,
            "experts_touched": touched, "dense_bytes": 3 * D * d_ff * size,
            "moe_bytes": 3 * D * (S + touched * d_e) * size + E * D * 4,
            "dense_flops": 2 * 3 * D * d_ff * T,
            "moe_flops": 2 * 3 * D * (S + top_k * d_e) * T + 2 * E * D * T, "parts_ms": parts}


def add_roofline(rows: list[dict], tokens: list[int]) -> None:
    """The ideal speedup, efficiency and achieved rate of each row of one shape, from the bandwidth
    (bytes/ms) its dense FFN reaches at the smallest T and the FLOP rate at the largest."""
    bandwidth = max(r["dense_bytes"] / r["dense_ms"] for r in rows if r["T"] == min(tokens))
    rate = max(r["dense_flops"] / r["dense_ms"] for r in rows if r["T"] == max(tokens))
    for r in rows:
        roof = lambda kind: max(r[f"{kind}_bytes"] / bandwidth, r[f"{kind}_flops"] / rate)
        memory_bound = r["moe_bytes"] / bandwidth >= r["moe_flops"] / rate
        achieved = f"{r['moe_bytes'] / r['moe_ms'] / 1e6:8.1f} GB/s" if memory_bound \
            else f"{r['moe_flops'] / r['moe_ms'] / 1e9:6.2f} TFLOP/s"
        r |= {"ideal": roof("dense") / roof("moe"), "memory_bound": memory_bound,
              "achieved": achieved}
        r["efficiency"] = r["speedup"] / r["ideal"]


def print_ffn_row(r: dict) -> None:
    print(f"{r['shape']:>11} {r['active']:5.2f} {r['T']:5d} {r['routing']:>8} {r['path']:>8} "
          f"{r['dense_ms']:9.3f} {r['moe_ms']:9.3f} {r['speedup']:7.2f}x "
          f"{r['ideal']:5.2f}x {r['efficiency']:5.2f} {r['achieved']:>14}")
    p = r["parts_ms"]
    if p:
        gemms = ""
        if "gemms" in p:
            gemms = (f" (grouped GEMMs {p['gemms']:.3f}, permutation "
                     f"{p['experts'] - p['gemms']:.3f})")
        rest = r["moe_ms"] - p["router"] - p["shared"] - p["experts"]
        print(f"{'':>11} parts ms: router {p['router']:.3f}, shared {p['shared']:.3f}, "
              f"experts {p['experts']:.3f}{gemms}, rest {rest:.3f}")

# -----------------------------------------------------------------------------
# model: the demo model, dense vs converted, prefill and decode


def model_bench(device: str, dtype: str, active: float, prefill_tokens: int, new_tokens: int,
                compile_modes: list[str], data: str, min_time: float) -> list[dict]:
    print(header(device, dtype))
    path = demo_checkpoint()
    tokenizer = load_tokenizer(path)
    dt = getattr(torch, dtype)
    moe = load_model(path, torch.float32)
    files = [os.path.join(data, f) for f in TASK_FILES.values()]
    if all(os.path.isfile(f) for f in files):
        calib = calibration_from_files(tokenizer, files, 8, 256, 0)
    else:
        calib = calibration_from_model(moe, tokenizer, 4, 128, 0)
    convert(moe, calib, ConvertSpec(active=active), log=lambda *_: None)
    models = {"dense": load_model(path, dt, device),
              f"moe-{active:g}": moe.to(device=device, dtype=dt)}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, moe.cfg.vocab_size, (1, prefill_tokens), generator=g).to(device)
    rows = []
    for name, model in models.items():
        for mode in compile_modes:
            kernels.use_kernels(model, compile=mode == "compiled")
            forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
            with torch.no_grad():
                t_prefill, = measure([lambda: forward(prompt)], device, min_time, max_runs=20)
                model.setup_caches(1, 16 + new_tokens)
                model(prompt[:, :16], torch.arange(16, device=device))
                token = prompt[:, 16:17]

                def decode():
                    for i in range(new_tokens):
                        forward(token, torch.tensor([16 + i], device=device))
                t_decode, = measure([decode], device, min_time, max_runs=5)
            row = {"model": name, "mode": mode, "prefill_tok_s": prefill_tokens / t_prefill,
                   "decode_tok_s": new_tokens / t_decode}
            rows.append(row)
            print(f"{name:>10} {mode:>9}: prefill {row['prefill_tok_s']:9.0f} tok/s "
                  f"(T={prefill_tokens})  decode {row['decode_tok_s']:7.1f} tok/s (batch 1, "
                  f"{new_tokens} tokens)")
    for mode in compile_modes:
        d, m = (r for r in rows if r["mode"] == mode)  # dense first
        print(f"{mode}: MoE / dense prefill x{m['prefill_tok_s'] / d['prefill_tok_s']:.2f}, "
              f"decode x{m['decode_tok_s'] / d['decode_tok_s']:.2f}")
    return rows

# -----------------------------------------------------------------------------
# convert: a synthetic checkpoint with a real model's shapes, converted layer by layer

SYNTH_CONFIGS = {
    "llama3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                  "tie_word_embeddings": False, "max_position_embeddings": 131072,
                  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False, "max_position_embeddings": 32768},
}


def synth_checkpoint(name: str, layers: int | None, out: str) -> str:
    """Random bf16 weights with the shapes of a real model (`layers` to make it shorter), written
    a layer at a time so memory stays at about one shard. Norm weights are ones, as in a fresh
    model."""
    hf = dict(SYNTH_CONFIGS[name], torch_dtype="bfloat16")
    hf["num_hidden_layers"] = layers or hf["num_hidden_layers"]
    cfg = ModelConfig.from_hf(hf)
    g = torch.Generator().manual_seed(0)

    def random(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    t0 = time.time()
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp)
        writer.add("model.embed_tokens.weight", random(cfg.vocab_size, cfg.dim))
        for i in range(cfg.n_layers):
            with torch.device("meta"):
                shapes = {n: t.shape for n, t in Block(cfg, i).state_dict().items()}
            for n, shape in shapes.items():
                norm = n.endswith("norm.weight")
                writer.add(f"model.layers.{i}.{n}",
                           torch.ones(shape, dtype=torch.bfloat16) if norm else random(*shape))
        writer.add("model.norm.weight", torch.ones(cfg.dim, dtype=torch.bfloat16))
        writer.add("lm_head.weight", random(cfg.vocab_size, cfg.dim))
        writer.finish()
        writer.json("config.json", hf)
        size = writer.total_bytes
    print(f"synth: wrote {out} ({name}, {cfg.n_layers} layers, {size / 2**30:.1f} GiB bf16) in "
          f"{time.time() - t0:.0f}s")
    return out


def convert_bench(name: str, layers: int | None, directory: str, samples: int, seqlen: int,
                  tasks: int, device: str, dtype: str, keep: bool) -> dict:
    """Converts a synthetic checkpoint (written first, by a child process so its memory is not
    counted here): wall time per stage and peak RSS of this process. Calibration: random tokens,
    `tasks` tasks drawing from separate slices of the vocabulary (the weights are random, so text
    would mean nothing)."""
    import subprocess
    import sys
    source = os.path.join(directory, f"{name}-{layers or 'all'}")
    if not os.path.isfile(os.path.join(source, "config.json")):
        subprocess.run([sys.executable, os.path.abspath(__file__), "synth", name, "--out", source]
                       + (["--layers", str(layers)] if layers else []), check=True)
    hf = json.load(open(os.path.join(source, "config.json")))
    vocab, n_layers = hf["vocab_size"], hf["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    width = vocab // tasks
    tokens = torch.cat([torch.randint(t * width, (t + 1) * width, (samples, seqlen), generator=g)
                        for t in range(tasks)])
    task = torch.arange(tasks).repeat_interleave(samples)
    calib = Calibration(tokens, task, [f"task{t}" for t in range(tasks)])
    print(header(device, dtype))
    print(f"converting {source}: {n_layers} layers, calibration {tasks} tasks x {samples} x "
          f"{seqlen} tokens")
    out = source + "-moe"
    t0 = time.time()
    report = convert_checkpoint(source, out, calib, ConvertSpec(), getattr(torch, dtype), device,
                                torch.bfloat16, log=lambda line: print(line, flush=True))
    seconds = time.time() - t0
    peak = peak_rss_gib()
    timings = report["timings"]
    calib_tokens = tasks * samples * seqlen
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(f"time per stage: {stages}; total {seconds:.1f}s")
    print(f"per layer: {seconds / n_layers:.2f}s; profile "
          f"{timings['profile'] / n_layers / calib_tokens * 1e3:.3f}s per 1k calibration tokens; "
          f"partition + router {(timings['partition'] + timings['router']) / n_layers:.2f}s")
    print(f"peak RSS {peak:.2f} GiB")
    if not keep:
        shutil.rmtree(out)
    return {"model": name, "layers": n_layers, "seconds": seconds, "timings": timings,
            "peak_rss_gib": peak, "calib_tokens": calib_tokens, "device": device, "dtype": dtype}


def partition_bench(name: str, samples: int, tokens: int, repeats: int) -> dict:
    """Partition + router for one layer of `name`'s shape, random weights, profiles of `samples`
    samples from random inputs: what conversion spends per layer besides the forward passes."""
    D, d_ff = SYNTH_CONFIGS[name]["hidden_size"], SYNTH_CONFIGS[name]["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        mlp = MLP(D, d_ff)
    weights = {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in mlp.state_dict().items()}
    mlp.load_state_dict(weights, assign=True)
    x = torch.randn(samples, tokens, D, generator=g)
    task = torch.arange(4).repeat_interleave(samples // 4)
    stats = profile_layer(x, mlp, contribution=True)
    print(header("cpu", "float32"))
    rows = []
    # 45 shared experts: the paper's largest shared expert; 8: 56 experts to cluster, the hard case.
    # The paper's router is a mean of rows; lsq solves a (D+1)-dimensional ridge regression per
    # strength
    for router, n_shared in itertools.product(("centroid", "lsq"), (45, 8)):
        spec = ConvertSpec(n_shared=n_shared, router=router)
        runs = []
        for r in range(repeats):
            t0 = time.perf_counter()
            plan = plan_expertweaver(stats, task, spec, seed=r)
            t1 = time.perf_counter()
            fit_router(build_moe(mlp, plan, router), plan, x, task)
            t2 = time.perf_counter()
            runs.append((t1 - t0, t2 - t1, plan.info["kmeans_iters"]))
        partition, router_s, iters = (statistics.median(v) for v in zip(*runs))
        row = {"shape": name, "d_ff": d_ff, "samples": samples, "router": router,
               "shared_experts": n_shared, "routed_experts": plan.groups.shape[0],
               "kmeans_iters": iters, "seconds": partition + router_s, "partition": partition,
               "router_seconds": router_s}
        rows.append(row)
        print(f"{name} layer (d_ff {d_ff}, {samples}-sample profiles), {row['routed_experts']} "
              f"routed experts, router {router}: allocate + partition {partition:.2f}s "
              f"({iters:.0f} k-means iterations), router {router_s:.3f}s (median of {repeats})")
    return rows

# -----------------------------------------------------------------------------
# quality


def task_files(data: str, command: str) -> dict[str, str]:
    files = {task: os.path.join(data, f) for task, f in TASK_FILES.items()}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"bench {command} needs the task files in --data (../shared/data "
                                f"beside the repository, or --data DIR); missing: "
                                f"{', '.join(missing)}")
    return files


def ffn_flops(cfg) -> dict:
    """Per token, summed over layers: FLOPs of the dense FFNs, of the MoE FFNs' experts, and of
    their routers (multiply-adds x 2). gate and oracle routers compute projections of every routed
    neuron, so they cost what those neurons would."""
    D, d_ff = cfg.dim, cfg.ffn_dim
    per_router = {"centroid": lambda E, n: 2 * D * E, "lsq": lambda E, n: 2 * D * E + E,
                  "cmoe": lambda E, n: 4 * D * E, "gate": lambda E, n: 2 * D * n,
                  "oracle": lambda E, n: 6 * D * n, "none": lambda E, n: 0}
    dense = experts = router = 0
    for layer in (cfg.moe["layers"] if cfg.moe else [None] * cfg.n_layers):
        dense += 6 * D * d_ff
        if layer is None:
            experts += 6 * D * d_ff
            continue
        d_e, E = cfg.moe["expert_dim"], layer["routed_experts"]
        experts += 6 * D * (layer["shared_neurons"] + layer["top_k"] * d_e)
        router += per_router[cfg.moe["router"]](E, E * d_e) if layer["top_k"] else 0
    return {"dense": dense, "experts": experts, "router": router}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


DEFAULT_ROWS = ["expertweaver:centroid:shared_by=activation", "expertweaver:centroid",
                "expertweaver:lsq", "expertweaver:gate", "expertweaver:cmoe", "expertweaver:oracle",
                "cmoe", "cmoe:lsq", "static", "random:centroid",
                "expertweaver:lsq:alpha_min=0:alpha_max=0.3:n_experts=128"]


def parse_row(row: str) -> dict:
    """'method[:router][:key=value...]' -> ConvertSpec keyword arguments."""
    method, *rest = row.split(":")
    spec = {"method": method}
    for part in rest:
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in ConvertSpec.__dataclass_fields__:
                raise ValueError(f"row {row!r}: {key!r} is not a ConvertSpec field")
            default = getattr(ConvertSpec, key)
            if not isinstance(default, str):
                value = json.loads(value.lower())  # numbers and true/false
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
                spec = ConvertSpec(active=active, seed=seed,
                                   **{**layout, **parse_row(row.partition("+")[0])})
                if cfg is not None:
                    check_layers(spec, cfg.ffn_dim, cfg.n_layers)
            except ValueError as e:
                raise ValueError(f"row {row!r} at --active {active}: {e}") from None
            specs[row, active] = spec
    return specs


def quality(data: str, rows: list[str], actives: list[float], calib_samples: int, calib_seqlen: int,
            eval_seqlen: int, eval_windows: int, holdout: float, seed: int,
            plot: str | None = None, plot_rows: list[str] | None = None) -> list[dict]:
    files = task_files(data, "quality")
    path = demo_checkpoint()
    specs = row_specs(rows, actives, seed, load_config(path)[0])
    unknown = set(plot_rows or ()) - set(rows)
    if unknown:
        raise ValueError(f"--plot-rows {', '.join(sorted(unknown))}: not among --rows")
    tokenizer = load_tokenizer(path)
    specs = [f"{f}:{task}" for task, f in files.items()]
    calib = calibration_from_files(tokenizer, specs, calib_samples, calib_seqlen, seed, holdout)
    evals = {task: heldout_tokens(tokenizer, f, holdout) for task, f in files.items()}
    print(f"calibration: {len(calib.names)} tasks x {calib_samples} windows x {calib_seqlen} "
          f"tokens; evaluation: held-out last {holdout:.0%} of each file, {eval_windows} windows "
          f"x {eval_seqlen} tokens")

    def ppl_per_task(model):
        return {task: perplexity(model, tokens, eval_seqlen, eval_windows)[1]
                for task, tokens in evals.items()}

    t0 = time.time()
    dense = ppl_per_task(load_model(path))
    print("dense ppl: " + ", ".join(f"{t} {p:.3f}" for t, p in dense.items())
          + f" ({time.time() - t0:.0f}s)")
    results = []
    for (row, active), spec in specs.items():
        model = load_model(path)
        t0 = time.time()
        convert(model, calib, spec, log=lambda *_: None)
        seconds = time.time() - t0
        ppl = ppl_per_task(model)
        flops = ffn_flops(model.cfg)
        ratios = {t: ppl[t] / dense[t] for t in ppl}
        used = flops["experts"] + flops["router"]
        result = {"row": row, "router": spec.router, "active": active, "ratio": ratios,
                  "geomean": geomean(ratios.values()), "ppl": ppl, "convert_seconds": seconds,
                  "router_share": flops["router"] / used, "active_flops": used / flops["dense"]}
        results.append(result)
        print(f"{row:>55} active {active:.2f}: "
              + "  ".join(f"{t} x{r:.3f}" for t, r in ratios.items())
              + f"  geomean x{result['geomean']:.3f}  router {result['router_share']:.1%} of "
              f"MoE FLOPs ({seconds:.0f}s)", flush=True)
    print_quality_tables(results, dense)
    if plot:
        lines = [(row, *zip(*sorted((100 * r["active_flops"], r["geomean"])
                                    for r in results if r["row"] == row)))
                 for row in plot_rows or rows]
        draw(plot, lines, "FFN FLOPs used per token, router included (% of the dense FFN)",
             "held-out ppl / dense ppl (geomean of 4 tasks)",
             "the demo model converted: quality against compute")
    return [{"row": "dense", "ppl": dense}] + results


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
    # how much of the way from the paper's router to the oracle each row goes, same partition
    base = {r["active"]: r for r in results if r["row"] == "expertweaver:centroid"}
    best = {r["active"]: r for r in results if r["row"] == "expertweaver:oracle"}
    if not (base and best):
        return
    print("\nshare of the centroid -> oracle gap closed (ExpertWeaver partition)\n")
    table = []
    for r in results:
        a = r["active"]
        ends = ("expertweaver:centroid", "expertweaver:oracle")
        if a in base and a in best and r["row"] not in ends:
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
    rows = train.train(checkpoint, out, spec, val_seqlen=val_seqlen, val_windows=val_windows,
                       val_every=val_every, log_every=8,
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
                   **common):
    """-> (TrainSpec maker with the common settings, the demo's path, its calibration windows).
    Warm-up: a tenth of the budget's steps."""
    from train import TrainSpec
    steps = max(1, common["tokens"] // (common["seqlen"] * common["batch"]))
    common.setdefault("warmup", max(1, steps // 10))
    specs = tuple(f"{f}:{task}" for task, f in task_files(data, command).items())
    path = demo_checkpoint()
    calib = calibration_from_files(load_tokenizer(path), list(specs), calib_samples, calib_seqlen,
                                   seed, common["holdout"])
    print(header("cpu", "float32"))
    return (lambda **kw: TrainSpec(data=specs, seed=seed, **{**common, **kw})), path, calib


def converted_into(path: str, out: str, calib: Calibration, spec: ConvertSpec,
                   log=lambda *_: None) -> dict:
    """The demo converted in float32 into `out`; -> the conversion's report."""
    return convert_checkpoint(path, out, calib, spec, torch.float32, "cpu", torch.float32, log=log)


def healed(moe: str, out: str, spec, convert_spec: ConvertSpec, val_windows: int, label: str,
           val_seqlen: int) -> dict:
    """A conversion healed with LoRA and its router, `scaled` routing (gamma = 0: training starts
    at the converted model itself); LoRA alone where nothing routes (static pruning)."""
    routed = convert_spec.router != "none"
    heal_spec = spec(train=("lora", "router"), routing="scaled") if routed else \
        spec(train=("lora",))
    return trained(moe, out, heal_spec, val_windows, 10**9, label, val_seqlen)


def dive_retrained(moe: str, work: str, spec, budget: dict, stage0: float, temperature: float,
                   val_windows: int, label: str, val_seqlen: int) -> dict:
    """DIVE's two stages: a `stage0` share of the tokens for the router alone over every expert at
    `temperature`, then LoRA + router + norms on the rest."""
    tokens0 = max(budget["seqlen"] * budget["batch"], int(budget["tokens"] * stage0))
    first = trained(moe, os.path.join(work, "s0"),
                    spec(train=("router",), dense_routing=temperature, tokens=tokens0),
                    val_windows, 10**9, f"{label} stage 0", val_seqlen)
    run = trained(os.path.join(work, "s0"), os.path.join(work, "healed"),
                  spec(train=("lora", "router", "norms"), lora_alpha=16.0,
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
         calib_seqlen: int, val_windows: int, seed: int, val_seqlen: int = 512) -> list[dict]:
    """Each conversion healed with LoRA (attention and every FFN projection) and its router, with
    scaled routing (gamma = 0: training starts at the converted model itself); the dense model gets
    the same LoRA, data and budget (tokens, seqlen, batch, lr, holdout)."""
    task_files(data, "heal")
    convert_specs = row_specs(rows, actives, seed, load_config(demo_checkpoint())[0])
    spec, path, calib = training_setup(data, "heal", calib_samples, calib_seqlen, seed, **budget)
    results = []
    with scratch("heal") as work:
        dense = trained(path, os.path.join(work, "dense"), spec(train=("lora",)), val_windows,
                        10**9, "dense", val_seqlen)
        for (row, active), convert_spec in convert_specs.items():
            moe = os.path.join(work, "moe")
            converted_into(path, moe, calib, convert_spec)
            run = healed(moe, os.path.join(work, "healed"), spec, convert_spec, val_windows,
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
    spec, path, calib = training_setup(data, "downcycle", calib_samples, calib_seqlen, seed,
                                       train=("all",), **budget)
    results = []
    with scratch("downcycle") as work:
        dense = trained(path, os.path.join(work, "dense"), spec(), val_windows, val_every, "dense",
                        val_seqlen)
        for row in rows:
            start = row.partition("+")[2]
            convert_spec = convert_specs[row, layout["active"]]
            moe = os.path.join(work, "moe")
            converted_into(path, moe, calib, convert_spec)
            train_spec = spec(routing="softmax", balance=balance, keep_function=start == "keep")
            run = trained(moe, os.path.join(work, "trained"), train_spec, val_windows, val_every,
                          row, val_seqlen)
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
        if convert_spec.method == "dive":
            check_dive_assign(convert_spec, len(task_files(data, "dive")) * parts, assigned=False,
                              windows=calib_samples)
    spec, path, calib = training_setup(data, "dive", calib_samples, calib_seqlen, seed, **budget)
    results = []
    with scratch("dive") as work:
        tokenizer = load_tokenizer(path)
        pieces = domain_parts(tokenizer, task_files(data, "dive"), parts, budget["holdout"], work)
        domains = calibration_from_files(tokenizer, pieces, calib_samples, calib_seqlen, seed,
                                         holdout=0.0)
        dense = trained(path, os.path.join(work, "dense"), spec(train=("lora",)), val_windows,
                        10**9, "dense", val_seqlen)
        dense |= dict(zip(("ffn_params", "params"), checkpoint_size(path)))
        for row, convert_spec in convert_specs.items():
            moe, is_dive = os.path.join(work, "moe"), convert_spec.method == "dive"
            report = converted_into(path, moe, domains if is_dive else calib, convert_spec,
                                    log=lambda line: line.startswith("layer") or print(line))
            size = dict(zip(("ffn_params", "params"), checkpoint_size(moe)))
            if is_dive:
                run = dive_retrained(moe, work, spec, budget, stage0, temperature, val_windows,
                                     row, val_seqlen)
                run["groups"] = report["dive"]["groups"]
            else:
                run = healed(moe, os.path.join(work, "healed"), spec, convert_spec, val_windows,
                             row, val_seqlen)
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
    import convert as exporter  # its EXPORT_EPS is set per row
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
    rows, default_eps = [], exporter.EXPORT_EPS
    try:
        spec = ConvertSpec(n_shared=45, router_bias=False, seed=seed)
        ours_path = os.path.join(work, "ours")
        converted_into(path, ours_path, calib, spec)
        ours = load_model(ours_path)
        softmax_path = os.path.join(work, "softmax")
        softmax = load_model(ours_path)
        set_routing(softmax, "softmax", norm_topk=True)
        hf_config = json.load(open(os.path.join(ours_path, "config.json")))
        save_checkpoint(softmax, hf_config, softmax_path, copy_from=ours_path)
        for routing, eps in [("sum", e) for e in eps_values] + [("softmax", None)]:
            exporter.EXPORT_EPS = eps or default_eps
            source, model = (ours_path, ours) if routing == "sum" else (softmax_path, softmax)
            out = os.path.join(work, "hf")
            layout = exporter.export_qwen2_moe(source, out, torch.float32, log=lambda *_: None)
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
        exporter.EXPORT_EPS = default_eps
        shutil.rmtree(work, ignore_errors=True)
    return rows


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
    if hasattr(a, "device"):
        check_device(a.device)
    if a.command not in ("heal", "downcycle", "dive"):
        torch.set_grad_enabled(False)
    if a.command in ("ffn", "model", "convert"):
        a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.command in ("heal", "downcycle", "dive"):  # the training budget
        budget = dict(tokens=a.tokens, seqlen=a.seqlen, batch=a.batch, lr=a.lr, holdout=a.holdout)
    if a.command == "ppl":
        return [ppl(a.checkpoint, a.file, a.field, a.seqlen, a.max_windows, a.dtype, a.device)]
    elif a.command == "ffn":
        tokens = a.tokens or ([1, 16, 128, 2048] if a.device.startswith("cuda") else [1, 16, 128])
        return ffn_bench(a.device, a.dtype, a.shapes, a.active, tokens, a.routing, a.experts,
                         a.compile, a.min_time, a.breakdown)
    elif a.command == "model":
        return model_bench(a.device, a.dtype, a.active, a.prefill, a.new_tokens, a.modes, a.data,
                           a.min_time)
    elif a.command == "synth":
        return [{"out": synth_checkpoint(a.model, a.layers, a.out)}]
    elif a.command == "convert":
        return [convert_bench(a.model, a.layers, a.dir, a.samples, a.seqlen, a.tasks, a.device,
                              a.dtype, a.keep)]
    elif a.command == "partition":
        return partition_bench(a.model, a.samples, a.tokens, a.repeats)
    elif a.command == "quality":
        return quality(a.data, a.rows, a.active, a.calib_samples, a.calib_seqlen, a.eval_seqlen,
                       a.eval_windows, a.holdout, a.seed, a.plot, a.plot_rows)
    elif a.command == "export":
        return export_bench(a.data, a.eps, a.calib_samples, a.calib_seqlen, a.holdout,
                            a.eval_windows, a.seed)
    elif a.command == "dive":
        return dive(a.data, a.rows, a.active, a.parts, budget, a.stage0, a.temperature,
                    a.calib_samples, a.calib_seqlen, a.val_windows, a.seed)
    elif a.command == "heal":
        return heal(a.data, a.rows, a.active, budget, a.calib_samples, a.calib_seqlen,
                    a.val_windows, a.seed)
    else:
        layout = dict(active=a.active, n_experts=a.experts, n_shared=a.n_shared)
        return downcycle(a.data, a.rows, layout, {**budget, "min_lr": a.min_lr}, a.balance,
                         a.calib_samples, a.calib_seqlen, a.val_windows, a.val_every, a.seed,
                         a.plot)


if __name__ == "__main__":
    import argparse
    defaults = argparse.ArgumentDefaultsHelpFormatter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description="Benchmarks: FFN and model speed, conversion quality "
                                "and training, each against the dense model in the same run.",
                                formatter_class=defaults)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("ppl", help="perplexity of a checkpoint on a text file",
                        formatter_class=defaults)
    pp.add_argument("checkpoint", help="checkpoint directory, or 'demo'")
    pp.add_argument("file", help="a .txt file, or a .jsonl file read through --field")
    pp.add_argument("--field", default=None,
                    help=".jsonl: the field(s) to read, comma-separated (default: 'text', or else "
                    "every string field)")
    pp.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    pp.add_argument("--max-windows", type=int, default=None, help="evaluate at most these windows")
    pp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights and arithmetic")
    pp.add_argument("--device", default=device, help="where the model runs")
    q = sub.add_parser("quality", help="held-out ppl ratio MoE / dense for conversions x active "
                       "fractions", formatter_class=defaults)
    q.add_argument("--rows", nargs="+", default=DEFAULT_ROWS,
                   help="conversions, each 'method[:router][:key=value...]' with ConvertSpec keys, "
                   "e.g. expertweaver:lsq:tau=0.3; a method alone takes its own router")
    q.add_argument("--active", nargs="+", type=float, default=[0.9, 0.75, 0.5],
                   help="active fractions")
    q.add_argument("--eval-seqlen", type=int, default=512, help="tokens per evaluation window")
    q.add_argument("--eval-windows", type=int, default=8, help="held-out windows per task")
    data_flags(q, "evaluated", "calibration windows and k-means")
    q.add_argument("--plot", default=None,
                   help="draw the geomean ppl ratio against the FFN FLOPs used, a line per row, "
                   "into this PNG (needs matplotlib)")
    q.add_argument("--plot-rows", nargs="+", default=None, help="the rows drawn (default: all)")
    fb = sub.add_parser("ffn", help="one FFN layer, dense vs MoE", formatter_class=defaults)
    fb.add_argument("--device", default=device, help="where the layers run")
    fb.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    fb.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                    help="FFN shapes (d, d_ff) of these models")
    fb.add_argument("--active", nargs="+", type=float, default=[0.5, 0.75],
                    help="active fractions f")
    fb.add_argument("--tokens", nargs="+", type=int, default=None,
                    help="token counts T (default 1 16 128 2048; on CPU 1 16 128, since T = 2048 "
                    "at 8B shapes takes seconds per call)")
    fb.add_argument("--routing", nargs="+", default=["router", "balanced"],
                    choices=["router", "balanced"],
                    help="experts chosen by a router (real load), or round-robin (even load)")
    fb.add_argument("--experts", type=int, default=64, help="N_e")
    fb.add_argument("--compile", action="store_true",
                    help="torch.compile the MoE forward (fullgraph)")
    fb.add_argument("--min-time", type=float, default=1.0,
                    help="seconds of timed runs per measurement at least")
    fb.add_argument("--breakdown", action="store_true",
                    help="also time the MoE call's parts alone: router, shared GLU, routed experts "
                    "(and, on the grouped path, its GEMMs without the permutation)")
    mb = sub.add_parser("model", help="demo model tokens/s, dense vs MoE", formatter_class=defaults)
    mb.add_argument("--device", default=device, help="where the model runs")
    mb.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    mb.add_argument("--active", type=float, default=0.5, help="active fraction of the MoE")
    mb.add_argument("--prefill", type=int, default=1024, help="prefill tokens")
    mb.add_argument("--new-tokens", type=int, default=128, help="decode steps")
    mb.add_argument("--modes", nargs="+", default=["eager", "compiled"],
                    choices=["eager", "compiled"],
                    help="as written, or torch.compile'd with the kernels")
    mb.add_argument("--data", default=DATA,
                    help="calibration files' directory (else the model writes its own)")
    mb.add_argument("--min-time", type=float, default=2.0,
                    help="seconds of timed runs per measurement at least")
    sb = sub.add_parser("synth", help="write a random-weight checkpoint with a real model's shapes")
    sb.add_argument("model", choices=list(SYNTH_CONFIGS), help="the shapes to copy")
    sb.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    sb.add_argument("--out", required=True, help="directory to write")
    cb = sub.add_parser("convert", help="time a streamed conversion of a synthetic checkpoint",
                        formatter_class=defaults)
    cb.add_argument("model", choices=list(SYNTH_CONFIGS), help="the shapes to copy")
    cb.add_argument("--layers", type=int, default=None, help="fewer layers than the real model")
    cb.add_argument("--dir", default="/tmp/expertweaver-synth",
                    help="where the synthetic checkpoints live")
    cb.add_argument("--samples", type=int, default=2, help="calibration windows per task")
    cb.add_argument("--seqlen", type=int, default=256, help="tokens per calibration window")
    cb.add_argument("--tasks", type=int, default=4, help="calibration tasks (random tokens)")
    cb.add_argument("--device", default=device, help="where the conversion runs")
    cb.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    cb.add_argument("--keep", action="store_true", help="keep the converted output")
    pb = sub.add_parser("partition", help="time partition + router for one layer",
                        formatter_class=defaults)
    pb.add_argument("model", choices=list(SYNTH_CONFIGS), help="the layer shape")
    pb.add_argument("--samples", type=int, default=64, help="calibration samples in the profile")
    pb.add_argument("--tokens", type=int, default=32, help="tokens per sample")
    pb.add_argument("--repeats", type=int, default=3, help="timed runs (the median is shown)")
    eb = sub.add_parser("export", help="the demo exported as Qwen2-MoE, run by transformers "
                        "against our model", formatter_class=defaults)
    eb.add_argument("--eps", nargs="+", type=float, default=[2.0 ** -12, 2.0 ** -10, 2.0 ** -8],
                    help="sum routing: the scales to export at")
    eb.add_argument("--eval-windows", type=int, default=4, help="held-out windows of 512 per task")
    data_flags(eb, "evaluated", "calibration windows and k-means")
    hb = sub.add_parser("heal", help="conversions healed with LoRA + router vs the dense model "
                        "trained alike", formatter_class=defaults)
    hb.add_argument("--rows", nargs="+", help="conversions, as in quality",
                    default=["expertweaver", "expertweaver:centroid:shared_by=activation", "cmoe",
                             "static"])
    hb.add_argument("--active", nargs="+", type=float, default=[0.75, 0.5], help="active fractions")
    hb.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (warm-up, cosine)")
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
    vb.add_argument("--rows", nargs="+", default=["dive", "dive:linear", "expertweaver", "cmoe"],
                    help="conversions, as in quality (dive: lsq router; dive:linear: DIVE's "
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
    a = p.parse_args()
    exit_on_sigterm()
    try:
        rows = run_command(a)
    except (ValueError, OSError) as e:  # bad input: the message names it
        sys.exit(f"bench.py: error: {e}")
    if a.json:
        where = header(getattr(a, "device", "cpu"), getattr(a, "dtype", "float32"))
        with open(a.json, "w") as f:
            json.dump({"command": a.command, "args": vars(a), "header": where, "rows": rows}, f,
                      indent=2)
