"""
bench.py: what a conversion buys in speed, each MoE figure against the dense model in the same run.

    python bench.py ffn --breakdown          # one FFN layer, dense vs MoE; where the time goes
    python bench.py split                    # an MoE layer vs its experts split again
    python bench.py model                    # the demo model: prefill and decode tokens/s
    python bench.py convert llama3-8b        # stream-convert a synthetic 8B checkpoint: time, RSS
    python bench.py partition llama3-8b      # partition + router of one 8B layer
    python bench.py ppl CHECKPOINT FILE --seqlen 1024   # perplexity of a checkpoint on a text file

Imports model.py, kernels.py, weaver.py, data.py, checkpoint.py, demo.py, convert.py (the drivers)
and flags.py (--help). The quality and training experiments of RESULTS.md are experiments.py. Run
benchmarks alone: with another job on the cores, the MoE's many small matmuls slow down far more
than the dense model's.

ffn: random weights at the FFN shapes of the demo model, LLaMA-3-8B and Qwen2.5-7B, N_e experts,
half of the active ones shared (CMoE's S = A split), routed by a centroid router on random inputs
("router") or by a forced round-robin ("balanced"). Times are medians after warm-up, dense and MoE
calls alternating; the MoE time includes the router. ideal = the roofline ratio, cost = max(bytes /
bandwidth, FLOPs / rate) with the bandwidth and FLOP rate this machine's dense FFN reaches at the
smallest and largest T, the bytes being those of the experts the tokens touch; efficiency = speedup
/ ideal.

model: the demo model dense and converted (ExpertWeaver), prefill tokens/s at T = 1024 (held-out
prose; random tokens without the data) and batch-1 decode tokens/s over 128 new tokens, eager and
torch.compile'd.

ppl: the GPTQ / CMoE protocol (data.perplexity) on a .txt file or the --field(s) of a .jsonl file.
"""
import itertools
import json
import os
import platform
import shutil
import sys
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from checkpoint import CheckpointWriter, exit_on_sigterm, output_dir
from convert import convert_checkpoint, convert_model, peak_rss_gib
from data import (Calibration, calibration_from_files, calibration_from_model, heldout_tokens,
                  perplexity, read_text)
from demo import demo_checkpoint, resolve
from model import (MLP, ModelConfig, MoEMLP, Transformer, check_device, load_model, load_tokenizer,
                   stored_tensors)
from weaver import ConvertSpec, build_moe, fit_router, plan_expertweaver, profile_layer

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
    # PyTorch's 2 MB pages for large CPU buffers change the MoE's CPU timings (RESULTS.md, Speed)
    pages = ", THP_MEM_ALLOC_ENABLE=1" if device == "cpu" and \
        os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" else ""
    return (f"device {device} ({name}), dtype {dtype}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{pages}")


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


def draw(file: str, lines: list[tuple], xlabel: str, ylabel: str, title: str,
         log_ticks: list[float] | None = None, legend_below: bool = False) -> None:
    """One line per (label, xs, ys), into a PNG; with log_ticks, a log y axis labelled at those
    values; legend_below puts the legend under the axes, where it hides no line. matplotlib is
    optional, imported here only."""
    try:
        import matplotlib
    except ImportError:
        print(f"no picture: matplotlib is not installed (pip install matplotlib); {file} not "
              f"written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5 + (0.25 * len(lines) if legend_below else 0)))
    for label, xs, ys in lines:
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    if log_ticks:
        ax.set_yscale("log")
        ax.set_yticks(log_ticks, [f"{t:g}" for t in log_ticks])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend_below:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1)
    else:
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
              breakdown: bool = False, paths: list[str] | None = None) -> list[dict]:
    """Rows of dense vs MoE FFN time, on the path kernels.choose_path picks, or on each of
    `paths`. The ideal speedup is a roofline ratio: cost = max(bytes /
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
                for routing, path in itertools.product(routings, paths or [None]):
                    row = ffn_row(x, w13, w2, layer, routing, compile, min_time, breakdown, path)
                    shape_rows.append({"shape": shape, "active": active, **row})
        add_roofline(shape_rows, tokens)
        for r in shape_rows:
            print_ffn_row(r)
        rows += shape_rows
    return rows


def ffn_row(x, w13, w2, layer, routing: str, compile: bool, min_time: float,
            breakdown: bool, path: str | None = None) -> dict:
    """One measurement: the dense FFN and the MoE on the same tokens x (T, D), on `path` or the
    one kernels.choose_path picks. routing "balanced": a large bias on round-robin experts forces
    the choice, the router still run."""
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
    path = path or kernels.choose_path(device.type, x.dtype, T, top_k, E, D, d_e, compile)
    compiled = compile and path != "select"
    run = torch.compile(moe, fullgraph=True, dynamic=False) if compiled else moe
    with torch.no_grad():
        t_dense, t_moe = measure([lambda: dense(x), lambda: run(x, path)], str(device), min_time)
        touched = len(route(x).unique())  # experts whose weights the step must read
        parts, faults = {}, None
        if breakdown:
            parts = ffn_parts(x, route, e13, e2, shared, path, str(device), min_time)
            faults = page_faults(lambda: run(x, path)) if device.type == "cpu" else None
    size = torch.finfo(x.dtype).bits // 8
    return {"D": D, "d_ff": d_ff, "T": T, "routing": routing, "path": path, "compiled": compiled,
            "dense_ms": t_dense * 1e3, "moe_ms": t_moe * 1e3, "speedup": t_dense / t_moe,
            "experts_touched": touched, "dense_bytes": 3 * D * d_ff * size,
            "moe_bytes": 3 * D * (S + touched * d_e) * size + E * D * 4,
            "dense_flops": 2 * 3 * D * d_ff * T,
            "moe_flops": 2 * 3 * D * (S + top_k * d_e) * T + 2 * E * D * T, "parts_ms": parts,
            "moe_page_faults": faults}


def page_faults(fn, calls: int = 5) -> float:
    """Minor page faults per call of fn (this process's, from getrusage): fresh memory the call
    touches for the first time, which a CPU pays for page by page (RESULTS.md, Speed)."""
    import resource  # Unix only, and only for --breakdown
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


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
        faults = "" if r["moe_page_faults"] is None else \
            f"; page faults per MoE call {r['moe_page_faults']:.0f}"
        print(f"{'':>11} parts ms: router {p['router']:.3f}, shared {p['shared']:.3f}, "
              f"experts {p['experts']:.3f}{gemms}, rest {rest:.3f}{faults}")

# -----------------------------------------------------------------------------
# split: an MoE layer against the two-level layer a recursive conversion makes of it

# (D, routed experts, F, top-k): one MoE layer of Qwen3-30B-A3B, and of experiments.py hierarchy's
# outer MoE (the demo at 16 experts of 96, its 4 shared ones left out)
MOE_SHAPES = {"qwen3-30b-a3b": (2048, 128, 768, 8), "demo-16x96": (576, 12, 96, 4)}


def random_moe(D: int, E: int, F_: int, K: int, split: dict | None, seed: int):
    """An MoEMLP of random weights (softmax routing by a trained-kind router, as a HF MoE's),
    its experts split as `split` says (model.SplitExperts) or whole."""
    moe = {"method": "stock", "expert_dim": F_, "router": "trained", "routing": "softmax",
           "norm_topk": True, "layers": []}
    layer = {"shared_neurons": 0, "routed_experts": E, "top_k": K,
             **({"split": split} if split else {})}
    mlp = MoEMLP(D, moe, layer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    if split:
        mlp.experts.neuron_index.copy_(torch.arange(F_).expand(E, F_))
    return mlp.eval()


def split_bench(shapes: list[str], inner: list[float], sub_experts: int, tokens: list[int],
                min_time: float) -> list[dict]:
    """Each MoE layer (eager, through kernels.layer_forward's chosen path) against its experts
    split into sub_experts parts at each inner fraction (half of the active parts shared, an lsq
    router over the parts), on the same tokens; ideal = the FLOPs ratio, routers included."""
    print(header("cpu", "float32"))
    print(f"{'shape':>14} {'inner':>5} {'T':>5} {'path':>8} {'moe ms':>8} {'split ms':>9} "
          f"{'speedup':>8} {'ideal':>6}")
    rows = []
    for shape in shapes:
        D, E, F_, K = MOE_SHAPES[shape]
        whole = random_moe(D, E, F_, K, None, 0)
        for fraction in inner:
            k = max(1, round(fraction * sub_experts))
            shared = round(k / 2)
            part = F_ // sub_experts
            split = {"shared_neurons": shared * part, "routed_experts": sub_experts - shared,
                     "expert_dim": part, "top_k": k - shared, "router": "lsq",
                     "router_bias": True}
            two = random_moe(D, E, F_, K, split, 0)
            for T in tokens:
                x = torch.randn(T, D, generator=torch.Generator().manual_seed(T))
                paths = [kernels.choose_path("cpu", x.dtype, T, K, E, D, F_)]
                paths.append(kernels.choose_path("cpu", x.dtype, T, K * (k - shared),
                                                 E * (sub_experts - shared), D, part))
                t_whole, t_split = measure(
                    [lambda: kernels.layer_forward(whole, x, paths[0]),
                     lambda: kernels.layer_forward(two, x, paths[1])], "cpu", min_time)
                flops_whole = 6 * D * K * F_ + 2 * D * E
                flops_split = 6 * D * K * (split["shared_neurons"] + split["top_k"] * part) + \
                    2 * D * E + 2 * D * E * split["routed_experts"]
                row = {"shape": shape, "inner": fraction, "T": T, "paths": paths,
                       "moe_ms": t_whole * 1e3, "split_ms": t_split * 1e3,
                       "speedup": t_whole / t_split, "ideal": flops_whole / flops_split}
                rows.append(row)
                print(f"{shape:>14} {fraction:5.2f} {T:5d} {paths[1]:>8} {row['moe_ms']:8.3f} "
                      f"{row['split_ms']:9.3f} {row['speedup']:7.2f}x {row['ideal']:5.2f}x")
    return rows

# -----------------------------------------------------------------------------
# model: the demo model, dense vs converted, prefill and decode


# the conversions `bench.py model` times against the dense demo: the default, the default with
# threshold selection (a token's number of experts varies), and the default before issue #26
LAYOUTS = {"default": {}, "threshold": {"selection": "threshold"},
           "old": {"n_experts": 64, "allocation": "cv", "router_bias": True}}


def model_bench(device: str, dtype: str, active: float, prefill_tokens: int, new_tokens: int,
                compile_modes: list[str], data: str, min_time: float,
                layouts: list[str] = ("default",)) -> list[dict]:
    print(header(device, dtype))
    path = demo_checkpoint()
    tokenizer = load_tokenizer(path)
    dt = getattr(torch, dtype)
    files = [os.path.join(data, f) for f in TASK_FILES.values()]
    real = all(os.path.isfile(f) for f in files)
    if real:
        calib = calibration_from_files(tokenizer, files, 8, 256, 0)
    else:
        calib = calibration_from_model(load_model(path, torch.float32), tokenizer, 4, 128, 0)
    models = {"dense": load_model(path, dt, device)}
    for layout in layouts:
        moe = load_model(path, torch.float32)
        convert_model(moe, calib, ConvertSpec(active=active, **LAYOUTS[layout]),
                      log=lambda *_: None)
        models[f"{layout}-{active:g}"] = moe.to(device=device, dtype=dt)
    # the prompt is held-out prose: threshold selection's experts per token follow the text, and
    # random tokens take fewer than real ones
    text = heldout_tokens(tokenizer, files[0], 0.1) if real else None
    if text is None or len(text) < prefill_tokens:
        print(f"prompt: {prefill_tokens} random tokens (no {files[0]} of that many held-out "
              f"tokens)")
        g = torch.Generator().manual_seed(0)
        text = torch.randint(0, models["dense"].cfg.vocab_size, (prefill_tokens,), generator=g)
    prompt = text[None, :prefill_tokens].to(device)  # (1, T)
    rows = []
    for name, model in models.items():
        for mode in compile_modes:
            kernels.use_kernels(model, compile=mode == "compiled")
            forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
            with torch.no_grad():
                t_prefill, = measure([lambda: forward(prompt)], device, min_time, max_runs=20)
                t_decode = decode_seconds(model, forward, prompt, new_tokens, device, min_time)
            row = {"model": name, "mode": mode, "prefill_tok_s": prefill_tokens / t_prefill,
                   "decode_tok_s": new_tokens / t_decode}
            rows.append(row)
            print(f"{name:>10} {mode:>9}: prefill {row['prefill_tok_s']:9.0f} tok/s "
                  f"(T={prefill_tokens})  decode {row['decode_tok_s']:7.1f} tok/s (batch 1, "
                  f"{new_tokens} tokens)")
    for mode in compile_modes:
        d, *moes = (r for r in rows if r["mode"] == mode)  # dense first
        for m in moes:
            print(f"{mode}: {m['model']} / dense prefill "
                  f"x{m['prefill_tok_s'] / d['prefill_tok_s']:.2f}, "
                  f"decode x{m['decode_tok_s'] / d['decode_tok_s']:.2f}")
    return rows


@torch.no_grad()
def decode_seconds(model, forward, prompt: torch.Tensor, new_tokens: int, device: str,
                   min_time: float) -> float:
    """Seconds for every row of prompt (B, >= 17) to decode new_tokens tokens, one at a time,
    after its first 16 are in the KV cache; forward is the model or its compiled self."""
    model.setup_caches(len(prompt), 16 + new_tokens)
    model(prompt[:, :16], torch.arange(16, device=device))
    token = prompt[:, 16:17]

    def decode():
        for i in range(new_tokens):
            forward(token, torch.tensor([16 + i], device=device))
    seconds, = measure([decode], device, min_time, max_runs=5)  # its warm-up compiles
    return seconds

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
    "llama3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "tie_word_embeddings": True, "max_position_embeddings": 131072},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 1536,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
             "tie_word_embeddings": True, "max_position_embeddings": 2048},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False, "max_position_embeddings": 32768},
    # Qwen3-30B-A3B's layout (q/k norms, 64 experts here against its 128, top-8, renormalised),
    # scaled to what this CPU converts in minutes: 1.3B parameters, 75M of experts per layer
    "qwen3-moe-16l": {"model_type": "qwen3_moe", "hidden_size": 1024, "intermediate_size": 3072,
                      "moe_intermediate_size": 384, "num_experts": 64, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "num_hidden_layers": 16, "num_attention_heads": 16,
                      "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 32768,
                      "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                      "max_position_embeddings": 32768},
}


def synth_checkpoint(name: str, layers: int | None, out: str, tokenizer: str | None = None) -> str:
    """Random bf16 weights with the shapes of a real model (`layers` to make it shorter), written
    a layer at a time so memory stays at about one shard. Norm weights are ones, as in a fresh
    model. tokenizer: a checkpoint whose tokenizer files to copy, so that train.py can read text
    (its ids must lie below the vocabulary)."""
    source = resolve(tokenizer) if tokenizer else None
    if source and not os.path.isfile(os.path.join(source, "tokenizer.json")):
        raise ValueError(f"--tokenizer {tokenizer}: no tokenizer.json in {source}")
    hf = dict(SYNTH_CONFIGS[name], torch_dtype="bfloat16")
    hf["num_hidden_layers"] = layers or hf["num_hidden_layers"]
    cfg = ModelConfig.from_hf(hf)
    g = torch.Generator().manual_seed(0)

    def random(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    # names and shapes only (meta), as the checkpoint stores them: a stock MoE's experts one by one
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in stored_tensors(Transformer(cfg)).items()}
    t0 = time.time()
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp)
        for n, shape in shapes.items():  # embedding, layer by layer, final norm, output head
            norm = n.endswith("norm.weight")
            writer.add(n, torch.ones(shape, dtype=torch.bfloat16) if norm else random(*shape))
        writer.finish()
        writer.json("config.json", hf)
        writer.copy_tokenizer(source)
        size = writer.total_bytes
    print(f"synth: wrote {out} ({name}, {cfg.n_layers} layers, {size / 2**30:.1f} GiB bf16) in "
          f"{time.time() - t0:.0f}s")
    return out


def convert_bench(name: str, layers: int | None, directory: str, samples: int, seqlen: int,
                  tasks: int, device: str, dtype: str, keep: bool,
                  n_experts: int | None = None, max_shard_gb: float = 2.0) -> dict:
    """Converts a synthetic checkpoint (written first, by a child process so its memory is not
    counted here) with the default spec (n_experts: its experts per layer, or per expert when the
    checkpoint is an MoE), in output shards of max_shard_gb (the converter holds one): wall time
    per stage and peak RSS of this process. Calibration: random tokens, `tasks` tasks drawing from
    separate slices of the vocabulary (the weights are random, so text would mean nothing)."""
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
    report = convert_checkpoint(source, out, calib, ConvertSpec(n_experts=n_experts),
                                getattr(torch, dtype), device, torch.bfloat16,
                                int(max_shard_gb * 2**30), log=lambda line: print(line, flush=True))
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
    if samples < 4 or samples % 4 or tokens < 1 or repeats < 1:
        raise ValueError(f"--samples {samples} must be a multiple of the 4 tasks, --tokens "
                         f"{tokens} and --repeats {repeats} at least 1")
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
    # The paper's router is a mean of rows; lsq solves a (D+1)-dim ridge regression per strength
    for router, n_shared in itertools.product(("centroid", "lsq"), (45, 8)):
        spec = ConvertSpec(n_experts=64, n_shared=n_shared, router=router, router_bias=True)
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


def run_cli(parser, run_command, script: str) -> None:
    """Parses the flags, runs the subcommand, writes its rows to --json with the machine's header;
    bad input ends the script with one line. experiments.py runs its commands through it too."""
    a = parser.parse_args()
    exit_on_sigterm()
    try:
        rows = run_command(a)
    except (ValueError, OSError) as e:  # bad input: the message names it
        sys.exit(f"{script}: error: {e}")
    if a.json:
        where = header(getattr(a, "device", "cpu"), getattr(a, "dtype", "float32"))
        with open(a.json, "w") as f:
            json.dump({"command": a.command, "args": vars(a), "header": where, "rows": rows}, f,
                      indent=2)


def run_command(a) -> list[dict]:
    """The subcommand parsed into `a`, run; -> its rows."""
    if hasattr(a, "device"):
        check_device(a.device)
    torch.set_grad_enabled(False)
    if a.command in ("ffn", "model", "convert"):
        a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    if a.command == "ppl":
        return [ppl(checkpoint=a.checkpoint, file=a.file, field=a.field, seqlen=a.seqlen,
                    max_windows=a.max_windows, dtype=a.dtype, device=a.device)]
    if a.command == "ffn":
        tokens = a.tokens or ([1, 16, 128, 2048] if a.device.startswith("cuda") else [1, 16, 128])
        return ffn_bench(device=a.device, dtype=a.dtype, shapes=a.shapes, actives=a.active,
                         tokens=tokens, routings=a.routing, n_experts=a.experts,
                         compile=a.compile, min_time=a.min_time, breakdown=a.breakdown,
                         paths=a.paths)
    if a.command == "model":
        return model_bench(device=a.device, dtype=a.dtype, active=a.active,
                           prefill_tokens=a.prefill, new_tokens=a.new_tokens,
                           compile_modes=a.modes, data=a.data, min_time=a.min_time,
                           layouts=a.layouts)
    if a.command == "synth":
        return [{"out": synth_checkpoint(name=a.model, layers=a.layers, out=a.out,
                                         tokenizer=a.tokenizer)}]
    if a.command == "convert":
        return [convert_bench(name=a.model, layers=a.layers, directory=a.dir, samples=a.samples,
                              seqlen=a.seqlen, tasks=a.tasks, device=a.device, dtype=a.dtype,
                              keep=a.keep, n_experts=a.experts, max_shard_gb=a.max_shard_gb)]
    if a.command == "split":
        return split_bench(shapes=a.shapes, inner=a.inner, sub_experts=a.sub_experts,
                           tokens=a.tokens, min_time=a.min_time)
    return partition_bench(name=a.model, samples=a.samples, tokens=a.tokens, repeats=a.repeats)


if __name__ == "__main__":
    import argparse

    from flags import HelpFormatter

    defaults = HelpFormatter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description="Speed benchmarks: an FFN layer, the demo model, a "
                                "streamed conversion, a partition; each MoE figure against the "
                                "dense model in the same run.", formatter_class=defaults)
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
    fb.add_argument("--paths", nargs="+", default=None, choices=list(kernels.PATHS),
                    help="time each of these kernel paths (default: the one kernels.choose_path "
                    "picks for each T)")
    fb.add_argument("--breakdown", action="store_true",
                    help="also time the MoE call's parts alone: router, shared GLU, routed experts "
                    "(and, on the grouped path, its GEMMs without the permutation), and on a CPU "
                    "count the MoE call's page faults")
    xb = sub.add_parser("split", help="an MoE layer vs its experts split again (CPU, eager)",
                        formatter_class=defaults)
    xb.add_argument("--shapes", nargs="+", default=list(MOE_SHAPES), choices=list(MOE_SHAPES),
                    help="MoE layer shapes (D, experts, F, top-k)")
    xb.add_argument("--inner", nargs="+", type=float, default=[0.75, 0.5],
                    help="active fractions of each expert's neurons")
    xb.add_argument("--sub-experts", type=int, default=8, help="parts per expert")
    xb.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256], help="token counts T")
    xb.add_argument("--min-time", type=float, default=1.0,
                    help="seconds of timed runs per measurement at least")
    mb = sub.add_parser("model", help="demo model tokens/s, dense vs MoE", formatter_class=defaults)
    mb.add_argument("--device", default=device, help="where the model runs")
    mb.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    mb.add_argument("--active", type=float, default=0.5, help="active fraction of the MoE")
    mb.add_argument("--layouts", nargs="+", default=["default"], choices=list(LAYOUTS),
                    help="the conversions timed: the default, it with --selection threshold, "
                    "and the default before issue #26 (64 experts, cv, router bias)")
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
    sb.add_argument("--tokenizer", default=None, help="copy this checkpoint's tokenizer files "
                    "(e.g. demo), so that train.py can read text into the model")
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
    cb.add_argument("--experts", type=int, default=None,
                    help="experts per layer (an MoE checkpoint: sub-experts per expert; default: "
                    "convert.py's)")
    cb.add_argument("--max-shard-gb", type=float, default=2.0,
                    help="largest output shard, which the converter holds in memory")
    pb = sub.add_parser("partition", help="time partition + router for one layer",
                        formatter_class=defaults)
    pb.add_argument("model", choices=list(SYNTH_CONFIGS), help="the layer shape")
    pb.add_argument("--samples", type=int, default=64, help="calibration samples in the profile")
    pb.add_argument("--tokens", type=int, default=32, help="tokens per sample")
    pb.add_argument("--repeats", type=int, default=3, help="timed runs (the median is shown)")
    run_cli(p, run_command, "bench.py")
