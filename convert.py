"""
convert.py: turn a dense GLU checkpoint into a Mixture-of-Experts checkpoint that model.py loads,
or split an MoE checkpoint's experts again (Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, or one of ours).

    python convert.py                       # the demo model, ExpertWeaver, 128 experts, 75% active
    python convert.py CHECKPOINT --out moe --calib wiki.txt --calib code.py:code --eval wiki.txt
    python convert.py MOE_CHECKPOINT --experts 8 --active 0.5 --calib wiki.txt:prose ...
    python generate.py moe --prompt "The capital of France is"

Imports model.py (the model, loading), weaver.py, dive.py and recursive.py (the methods), data.py
(calibration text, perplexity), checkpoint.py (atomic output, the writer), export.py (--format
qwen2_moe), demo.py (the demo checkpoint) and flags.py (the flags of the specs). Here: the
conversion drivers, in memory (convert_model) or streaming a checkpoint layer by layer
(convert_checkpoint), and the CLI. Prints a line per layer (specialisation r, alpha, shared / routed
experts, top-k, expert load on the calibration tokens), the time per stage and, with --eval, dense
and MoE perplexity on the held-out tail of each file. Writes DIR/config.json (with a "moe" section),
the safetensors shards, the tokenizer and DIR/report.json.
"""
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import budget
import dive
import recursive
import weaver
from checkpoint import (CheckpointWriter, check_out, check_space, checkpoint_config,
                        exit_on_sigterm, ours_temporary, output_dir, source_dtype)
from data import (TASK_PROMPTS, Calibration, calibration_from_files, calibration_from_model,
                  check_file, heldout_tokens, file_and_task, perplexity)
from demo import cache_dir, resolve
from export import export_problems, export_qwen2_moe, topk_spread
from flags import HelpFormatter, add_flags, from_flags, setting
from model import (RMSNorm, Transformer, check_checkpoint, check_device, load_block, load_config,
                   load_model, load_tokenizer, read_tensors, scaled_embedding)

DTYPES = ("float32", "bfloat16", "float16")

# -----------------------------------------------------------------------------
# the settings besides the method's: the text a conversion reads, and where its result goes


@dataclass
class DataSpec:
    """The text a conversion reads: its calibration, and the held-out text it is evaluated on."""
    calib: tuple = setting((), "calibration text (.txt, or .jsonl with --field); repeatable; the "
                           "task defaults to the file name; expertweaver needs 2 tasks or more. "
                           "Without it the model writes its own calibration text from built-in "
                           "prompts", action="append", metavar="FILE[:TASK]")
    samples: int = setting(8, "calibration windows per task", flag="--calib-samples")
    seqlen: int = setting(256, "tokens per calibration window", flag="--calib-seqlen")
    field: str | None = setting(None, ".jsonl field(s) to read, comma-separated (default: 'text', "
                                "or every string field)")
    holdout: float = setting(0.1, "the last fraction of each file's tokens: never calibrated on, "
                             "the only part --eval reads")
    evals: tuple = setting((), "report dense and MoE perplexity on the held-out part of FILE; "
                           "repeatable", flag="--eval", action="append", metavar="FILE")
    eval_seqlen: int = setting(1024, "tokens per evaluation window")
    eval_windows: int = setting(8, "evaluation windows per file at most")

    def __post_init__(self):
        self.calib, self.evals = tuple(self.calib), tuple(self.evals)
        for flag, name, low in (("--calib-samples", "samples", 1), ("--calib-seqlen", "seqlen", 2),
                                ("--eval-seqlen", "eval_seqlen", 2),
                                ("--eval-windows", "eval_windows", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"{flag} {getattr(self, name)} must be at least {low}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"--holdout {self.holdout} must be in [0, 1)")
        if self.evals and self.holdout == 0:
            raise ValueError("--eval reads the held-out tail of each file, so --holdout must be "
                             "above 0")


@dataclass
class RunSpec:
    """Where the result goes, in what form, and where the work runs."""
    out: str | None = setting(None, "output directory (default out/NAME-METHOD-ACTIVE); replaced "
                              "if an earlier run of expertweaver wrote it, refused if anything "
                              "else is there")
    format: str = setting("expertweaver", "expertweaver: our checkpoint (model.py loads it); "
                          "qwen2_moe: a stock Qwen2MoeForCausalLM checkpoint for transformers, "
                          "vLLM and SGLang. Given an MoE checkpoint of ours, qwen2_moe only "
                          "exports it", choices=["expertweaver", "qwen2_moe"])
    dtype: str | None = setting(None, "dtype of the weights while converting and evaluating "
                                "(default: float32 on a CPU, where bf16 arithmetic is often "
                                "emulated and many times slower; the source checkpoint's on a "
                                "GPU); statistics are float32 whatever it is", choices=DTYPES)
    save_dtype: str | None = setting(None, "dtype of the written weights (default: the source "
                                     "checkpoint's)", choices=DTYPES)
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda, ...")
    max_shard_gb: float = setting(2.0, "largest output shard; the converter holds at most one "
                                  "shard in memory")
    prompt: str = setting("The capital of France is", "print the MoE's greedy continuation of "
                          "this prompt at the end ('' to skip)")

    def __post_init__(self):
        if self.max_shard_gb <= 0:
            raise ValueError(f"--max-shard-gb {self.max_shard_gb} must be positive")
        check_device(self.device)


# -----------------------------------------------------------------------------
# the conversion drivers: in memory, or streaming a checkpoint layer by layer


def format_layer(row: dict, n_layers: int) -> str:
    head = f"layer {row['layer']:>{len(str(n_layers))}}/{n_layers}"
    if row["dense"] or row.get("kept_dense"):
        return f"{head}  dense ({row['seconds']:.1f}s)"
    if "split" in row:  # a recursive conversion's
        split, nested = row["split"], row.get("shared_split")
        text = (f"{head}  {row['experts_split']} experts, each {split['shared_neurons']} shared + "
                f"{split['routed_experts']} x {split['expert_dim']}, top-k {split['top_k']}")
        if nested:
            text += (f"; shared expert {nested['shared_neurons']} + {nested['routed_experts']} "
                     f"experts, top-k {nested['top_k']}")
        if row["topped_up"]:
            text += f"; {len(row['topped_up'])} topped up with their nearest tokens"
        return f"{text}  ({row['seconds']:.1f}s)"
    r = f"r {row['r']:.2f} alpha {row['alpha']:.2f}  " if row["r"] is not None else ""
    load = ""
    if row["load_max_over_mean"] is not None:
        load = f"  load max/mean {row['load_max_over_mean']:.2f}"
    k = f"top-k {row['top_k']:>3}" if "threshold" not in row else \
        f"experts above {row['threshold']:.3g} (>= {row['min_k']}): {row['mean_top_k']:5.1f} of " \
        f"top-k {row['top_k']}"
    return (f"{head}  {r}shared {row['shared_experts']:>3}  routed {row['routed_experts']:>3}  "
            f"{k}{load}  ({row['seconds']:.1f}s)")


def spec_class(method: str):
    """The settings dataclass of a method: DIVE's own, or weaver's for the others."""
    return dive.DiveSpec if method == "dive" else weaver.ConvertSpec


def run_layers(cfg, h: torch.Tensor, blocks, window_inputs, calib: Calibration,
               spec: weaver.ConvertSpec, log=print, write_block=None,
               make_head=None) -> tuple[dict, dict]:
    """weaver.layer_loop over a model's blocks with the spec's method; h: (S, T, D) the embedded
    calibration windows; blocks() gives the blocks, one pass each; write_block(i, block) takes each
    converted block. DIVE without given groups mines them first, with make_head() -> (h ->
    logits). An MoE's experts are converted in turn (recursive.py). Returns (the moe config
    section, the report)."""
    nested = cfg.moe is not None
    if nested:
        recursive.check_spec(spec, cfg.moe, cfg)
    else:
        spec.check_layers(cfg.ffn_dim, cfg.n_layers, cfg.dim)
    inputs = window_inputs(h.shape[1], h.dtype, h.device)
    run = lambda block, hb: block(hb, inputs)
    method = dive if isinstance(spec, dive.DiveSpec) else weaver  # the per-layer converter's
    mined = None
    if method is dive and spec.dive_assign is None:
        spec, mined = dive.mine(h, blocks(), run, make_head(), calib.tokens, calib.task,
                                calib.names, spec, log)
    moe_cfg = {**spec.moe_section(cfg.ffn_dim), "layers": [None] * cfg.n_layers,
               "topk_spread": [None] * cfg.n_layers}  # on the calibration tokens: export's scale
    if nested:  # the outer layout stays; each layer entry gains its split
        moe_cfg = {**cfg.moe, "layers": [None] * cfg.n_layers}
    rows, timings = [], {}
    converter = recursive if nested else method
    convert_layer = converter.layer_converter(spec, calib.task, h, timings)
    # threshold selection is fitted to the inputs each layer sees once the layers before it are
    # converted, so the mean experts per token hold in the converted model
    finish = weaver.set_threshold if spec.selection == "threshold" else None
    for i, block, row, x in weaver.layer_loop(blocks(), run, h, convert_layer, spec.dense_layers,
                                              spec.sequential, timings, finish):
        if not row["dense"] and not nested:
            with weaver.timed(timings, "build"):
                row["topk_spread"] = topk_spread(block.mlp, x) if block.mlp.top_k else None
        # a layer left as it is (--dense-layers) keeps its entry: dense, or an MoE layer unsplit
        moe_cfg["layers"][i] = row.pop("moe", cfg.moe["layers"][i] if nested else None)
        if not nested:
            moe_cfg["topk_spread"][i] = row.get("topk_spread")
        if write_block is not None:
            with weaver.timed(timings, "write"):
                write_block(i, block)
        rows.append(row)
        log(format_layer(row, cfg.n_layers))
    return moe_cfg, {"layers": rows, "timings": timings, **({"dive": mined} if mined else {})}


def spread_budget(model: Transformer, calib: Calibration, report: dict, log=print) -> None:
    """--budget global on the converted model, in place (budget.spread): the routed experts moved
    between layers at the same total, on the calibration windows."""
    t0 = time.perf_counter()
    section = budget.spread(model, calib.tokens.to(model.embed_tokens.weight.device))
    report["budget"] = section
    report["timings"]["budget"] = time.perf_counter() - t0
    log(f"budget global: routed top-k per layer {section['top_k']} (uniform "
        f"{sorted(set(section['uniform_top_k']))}), estimated calibration loss change "
        f"{section['estimated_loss_change']:+.4f} ({report['timings']['budget']:.1f}s)")


@torch.no_grad()
def convert_model(model: Transformer, calib: Calibration, spec: weaver.ConvertSpec,
                  log=print) -> dict:
    """In memory: replaces the FFN of every layer not in spec.dense_layers by an MoE FFN, in place,
    and sets model.cfg.moe. Returns the report: per-layer allocation and expert load, time per
    stage."""
    t0 = time.perf_counter()
    h = model.embed(calib.tokens.to(model.embed_tokens.weight.device))  # (S, T, D)
    timings = {"embed": time.perf_counter() - t0}
    make_head = lambda: (lambda x: model.lm_head(model.norm(x)))
    model.cfg.moe, report = run_layers(model.cfg, h, lambda: model.layers, model.window_inputs,
                                       calib, spec, log, make_head=make_head)
    report["timings"] = timings | report["timings"]
    if spec.budget == "global":
        spread_budget(model, calib, report, log)
    return report


@torch.no_grad()
def convert_checkpoint(path: str, out: str, calib: Calibration, spec: weaver.ConvertSpec,
                       dtype: torch.dtype,
                       device, save_dtype: torch.dtype, max_shard_bytes: int = 2 << 30,
                       extra: dict | None = None, log=print) -> dict:
    """Streaming: reads one block at a time from the checkpoint at `path` (per tensor), converts it,
    writes it to `out` in shards and lets it go, so memory holds the calibration hidden states,
    about two blocks and one output shard, whatever the depth. The same tensors as convert_model()
    followed by checkpoint.save_checkpoint(); `extra` JSON files too; `out` appears atomically at
    the end. --budget global then loads the converted model whole for its gradient pass."""
    cfg, hf_config = load_config(path)
    where = check_checkpoint(path, cfg)
    with torch.device("meta"):
        skeleton = Transformer(cfg)  # no memory: the names, shapes and rope of the real model
    cast = lambda t: t.to(save_dtype) if t.is_floating_point() else t
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp, max_shard_bytes)
        t0 = time.perf_counter()
        name = "model.embed_tokens.weight"
        embed = read_tensors(path, {name: skeleton.embed_tokens.weight}, dtype, "cpu", where)[name]
        h = scaled_embedding(cfg, F.embedding(calib.tokens, embed)).to(device)  # (S, T, D)
        writer.add("model.embed_tokens.weight", cast(embed))
        del embed
        timings = {"embed": time.perf_counter() - t0}
        blocks = lambda: (load_block(path, cfg, i, dtype, device, where)
                          for i in range(cfg.n_layers))
        tail = {"model.norm.weight": skeleton.norm.weight}
        if not cfg.tie_embeddings:
            tail["lm_head.weight"] = skeleton.lm_head.weight

        def write_block(i, block):
            for name, tensor in block.state_dict().items():
                writer.add(f"model.layers.{i}.{name}", cast(tensor))

        def make_head():  # DIVE's mining only: the final norm and the output projection
            head = tail if not cfg.tie_embeddings else \
                tail | {"model.embed_tokens.weight": skeleton.embed_tokens.weight}
            w = read_tensors(path, head, dtype, device, where)
            norm = RMSNorm(cfg.dim, cfg.norm_eps, cfg.gemma_norms).to(device)
            norm.weight.data = w["model.norm.weight"]
            out = w["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
            return lambda x: F.linear(norm(x), out)
        moe_cfg, report = run_layers(cfg, h, blocks, skeleton.window_inputs, calib, spec, log,
                                     write_block, make_head)
        t0 = time.perf_counter()
        for name, tensor in read_tensors(path, tail, dtype, "cpu", where).items():
            writer.add(name, cast(tensor))
        writer.finish()
        files = {"config.json": checkpoint_config(hf_config, moe_cfg, save_dtype), **(extra or {})}
        for name, content in files.items():
            writer.json(name, content)
        writer.copy_tokenizer(path)
        report["timings"] = timings | report["timings"]
        report["timings"]["write"] += time.perf_counter() - t0
        if spec.budget == "global":  # the one step that holds the whole converted model
            model = load_model(tmp, dtype, device)
            spread_budget(model, calib, report, log)
            writer.json("config.json", checkpoint_config(hf_config, model.cfg.moe, save_dtype))
    return report

# -----------------------------------------------------------------------------
# what the report shows


def active_fraction(cfg) -> float:
    """Share of the FFN neurons a token uses, averaged over layers (dense layers count as 1); for
    a layer split by a recursive conversion, the share of those the MoE it came from used."""
    if cfg.moe is None:
        return 1.0
    d_e, fractions = cfg.moe["expert_dim"], []
    used = lambda entry: entry["shared_neurons"] + entry["top_k"] * entry["expert_dim"]
    for layer in cfg.moe["layers"]:
        if layer is None:
            fractions.append(1.0)
        elif "split" in layer:
            shared = used(layer["shared_split"]) if layer.get("shared_split") else \
                layer["shared_neurons"]
            fractions.append((shared + layer["top_k"] * used(layer["split"]))
                             / (layer["shared_neurons"] + layer["top_k"] * d_e))
        else:
            fractions.append((layer["shared_neurons"] + layer["top_k"] * d_e) / cfg.ffn_dim)
    return sum(fractions) / len(fractions)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

# -----------------------------------------------------------------------------
# CLI


def check_args(spec: weaver.ConvertSpec, data: DataSpec) -> None:
    """What can be checked without the checkpoint, before any slow work."""
    for file in [file_and_task(c)[0] for c in data.calib] + list(data.evals):
        check_file(file)
    tasks = {file_and_task(c)[1] for c in data.calib}
    n_tasks = len(tasks) if data.calib else len(TASK_PROMPTS)
    if isinstance(spec, dive.DiveSpec):
        spec.check_tasks(n_tasks, mined=spec.dive_assign is None, windows=data.samples)
    else:
        spec.check_tasks(n_tasks)


def main(checkpoint: str, spec: weaver.ConvertSpec, data: DataSpec, run: RunSpec) -> dict:
    t_start = time.time()
    check_args(spec, data)
    format = run.format
    path = resolve(checkpoint)
    cfg, hf_config = load_config(path)
    name = os.path.basename(os.path.normpath(path))
    export_only = cfg.moe is not None and format == "qwen2_moe"  # an MoE checkpoint of ours
    out = run.out or os.path.join("out", f"{name}-qwen2_moe" if export_only else
                              f"{name}-{spec.method}-{round(spec.active * 100)}"
                              + ("-qwen2_moe" if format == "qwen2_moe" else ""))
    reads = (("checkpoint", path), ("demo cache", cache_dir()),
             *(("--calib file", file_and_task(c)[0]) for c in data.calib),
             *(("--eval file", f) for f in data.evals))  # what --out must not touch
    check_out(out, reads)
    check_checkpoint(path, cfg)
    if cfg.text_of_multimodal:
        print(f"{path}: a multimodal Gemma 3; its language model is converted and written alone "
              f"(gemma3_text), without the vision tower and projector")
    write_dtype = getattr(torch, run.save_dtype or source_dtype(hf_config))
    if export_only:
        check_space(out, output_bytes(cfg, None, write_dtype), "the export")
        layout = export_qwen2_moe(path, out, write_dtype, log=progress)
        print(f"wrote {out}: Qwen2-MoE, {layout['experts']} experts, top-{layout['top_k']}, shared "
              f"{layout['shared']} neurons, dense layers {layout['dense']} "
              f"({time.time() - t_start:.1f}s)")
        return {"export": layout}
    if cfg.moe is not None:  # its experts converted in turn (--format qwen2_moe exported above)
        recursive.check_spec(spec, cfg.moe, cfg)
    else:
        spec.check_layers(cfg.ffn_dim, cfg.n_layers, cfg.dim)
    problems = export_problems(cfg, spec) if format == "qwen2_moe" else []
    if problems:
        raise ValueError("--format qwen2_moe: " + "; ".join(problems))
    # a Qwen2-MoE export is converted into a temporary checkpoint of ours first, removed at the end
    copies = 2 if format == "qwen2_moe" else 1
    check_space(out, copies * output_bytes(cfg, spec, write_dtype), "the conversion")
    work = None
    if format == "qwen2_moe":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        work = ours_temporary(out)
    try:
        target = os.path.join(work, "moe") if work else out
        report = convert_and_evaluate(path, cfg, hf_config, target, spec, data, run)
        if work:
            report["export"] = export_qwen2_moe(os.path.join(work, "moe"), out, log=progress)
            write_report(out, report)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}" + (" as Qwen2-MoE" if work else "") + f" (active fraction "
          f"{report['active_fraction']:.3f}) in {time.time() - t_start:.1f}s total")
    return report


def output_bytes(cfg, spec: weaver.ConvertSpec | None, dtype: torch.dtype) -> int:
    """About what a conversion (or, spec None, an export) writes, from the dense model's shapes:
    every weight in `dtype`, DIVE's overlapping experts growing the FFN, and each layer's router
    and neuron index, with 5% to spare."""
    with torch.device("meta"):
        dense = Transformer(replace(cfg, moe=None))
    size = dtype.itemsize
    params = sum(p.numel() for p in dense.parameters())  # a tied embedding counts once
    neurons = cfg.ffn_dim
    experts = spec.n_experts if spec else max(layer["routed_experts"] if layer else 0
                                              for layer in cfg.moe["layers"])
    if isinstance(spec, dive.DiveSpec):
        neurons = spec.dive_groups * spec.expert_dim(cfg.ffn_dim)
        experts = spec.dive_groups
    per_layer = ((neurons - cfg.ffn_dim) * 3 * cfg.dim + experts * 2 * (cfg.dim + 1)) * size \
        + neurons * 8  # the int64 neuron index
    return int(1.05 * (params * size + cfg.n_layers * per_layer))


def progress(line: str) -> None:
    print(line, end="\r", flush=True)  # the next line overwrites it


def write_report(out: str, report: dict) -> None:
    with open(os.path.join(out, "report.json.tmp"), "w") as f:
        json.dump(report, f, indent=2)
    os.replace(os.path.join(out, "report.json.tmp"), os.path.join(out, "report.json"))


def convert_and_evaluate(path: str, cfg, hf_config: dict, out: str, spec: weaver.ConvertSpec,
                         data: DataSpec, run: RunSpec) -> dict:
    """Calibrates, converts the checkpoint at `path` into `out` and evaluates: main's slow part."""
    device, prompt = run.device, run.prompt
    calib, evals, holdout = list(data.calib), list(data.evals), data.holdout
    on_cpu = torch.device(device).type == "cpu"
    dtype = run.dtype or ("float32" if on_cpu else source_dtype(hf_config))
    save_dtype = run.save_dtype or source_dtype(hf_config)
    tokenizer = load_tokenizer(path)

    # the whole dense model is loaded only when needed: to write calibration text, or to evaluate it
    t0 = time.time()
    dense = load_model(path, getattr(torch, dtype), device) if evals or not calib else None
    if calib:
        calibration = calibration_from_files(tokenizer, calib, data.samples, data.seqlen, spec.seed,
                                             holdout, data.field,
                                             cfg.prefix_bos)
    else:
        calibration = calibration_from_model(dense, tokenizer, data.samples, data.seqlen, spec.seed)
    t_calib = time.time() - t0
    S, T = calibration.tokens.shape
    print(f"calibration: {S} windows x {T} tokens, tasks {', '.join(calibration.names)} "
          f"({t_calib:.1f}s)")
    eval_tokens = {f: heldout_tokens(tokenizer, f, holdout, data.field) for f in evals}
    windows = (data.eval_seqlen, data.eval_windows)
    dense_ppl = {f: evaluate(dense, f, t, *windows, "dense") for f, t in eval_tokens.items()}
    dense_text = greedy(dense, tokenizer, prompt, device) if prompt and dense is not None else None
    del dense

    layout = describe_layout(spec, cfg.ffn_dim) if cfg.moe is None else \
        f"each expert of {cfg.moe['expert_dim']} neurons split into " \
        f"{describe_layout(spec, cfg.moe['expert_dim'])}"
    print(f"converting {path} layer by layer on {device} in {dtype}: {spec.method}, router "
          f"{spec.router}, {layout} ({spec.active:.1%} of the neurons"
          f"{', in FLOPs' if spec.first_dense else ''})")
    t0 = time.time()
    report = {"source": path, "spec": asdict(spec),
              "calibration": {"windows": S, "seqlen": T, "tasks": calibration.names,
                              "files": calib}}
    layers = convert_checkpoint(path, out, calibration, spec, getattr(torch, dtype), device,
                                getattr(torch, save_dtype), int(run.max_shard_gb * 2**30),
                                {"report.json": report})
    t_convert = time.time() - t0
    report |= {"convert_seconds": t_convert,
               "timings": {"calibration": t_calib, **layers["timings"]},
               "layers": layers["layers"], "peak_rss_gib": peak_rss_gib(),
               **{key: layers[key] for key in ("dive", "budget") if key in layers}}
    print("time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
          + f"; conversion {t_convert:.1f}s, peak RSS {report['peak_rss_gib']:.2f} GiB")

    moe = load_model(out, getattr(torch, dtype), device)
    report["active_fraction"] = active_fraction(moe.cfg)
    report["eval"] = compare_heldout(moe, eval_tokens, dense_ppl, data)
    write_report(out, report)
    if prompt:
        if dense_text is not None:  # only when the dense model was loaded anyway
            print(f"dense greedy: {dense_text!r}")
        print(f"moe greedy:   {greedy(moe, tokenizer, prompt, device)!r}")
    return report


def describe_layout(spec: weaver.ConvertSpec, ffn_dim: int) -> str:
    if isinstance(spec, dive.DiveSpec):
        return (f"{spec.dive_groups} experts of {spec.expert_dim(ffn_dim)} neurons, "
                f"top-{spec.dive_top_k}")
    paid = f" in each converted layer, the first {spec.first_dense} dense" if spec.first_dense \
        else ""
    return (f"{spec.n_experts} experts of {ffn_dim // spec.n_experts} neurons, k = {spec.k} "
            f"active per token{paid}")


def compare_heldout(moe, eval_tokens: dict, dense_ppl: dict, data: DataSpec) -> dict:
    """The MoE's held-out perplexity on each file beside the dense model's, printed: the report's
    eval section."""
    result = {}
    if not eval_tokens:
        return result
    windows = (data.eval_seqlen, data.eval_windows)
    moe_ppl = {f: evaluate(moe, f, t, *windows, "moe") for f, t in eval_tokens.items()}
    print(f"held-out perplexity (last {data.holdout:.0%} of each file, {data.eval_windows} windows "
          f"x {data.eval_seqlen}):")
    for f in eval_tokens:
        ratio = moe_ppl[f][1] / dense_ppl[f][1]
        result[f] = {"dense_ppl": dense_ppl[f][1], "moe_ppl": moe_ppl[f][1], "ratio": ratio,
                     "windows": moe_ppl[f][2], "seqlen": data.eval_seqlen}
        print(f"  {os.path.basename(f):32s} dense {dense_ppl[f][1]:8.3f}  moe "
              f"{moe_ppl[f][1]:8.3f}  x{ratio:.3f}")
    return result


def greedy(model, tokenizer, prompt: str, device: str, new_tokens: int = 16) -> str:
    bos = [] if model.cfg.prefix_bos is None else [model.cfg.prefix_bos]  # Gemma reads after BOS
    ids = torch.tensor([bos + tokenizer.encode(prompt).ids], device=device)
    return tokenizer.decode(model.generate(ids, new_tokens)[0].tolist())


def evaluate(model, file: str, tokens: torch.Tensor, seqlen: int, windows: int, label: str):
    t0 = time.time()
    result = perplexity(model, tokens, seqlen, windows)
    print(f"  {label} ppl {os.path.basename(file)}: {result[1]:.3f} ({result[2]} windows, "
          f"{time.time() - t0:.1f}s)")
    return result


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Convert a dense LLaMA/Qwen/Mistral/Gemma 3 GLU "
                                "checkpoint into an MoE checkpoint with no training (ExpertWeaver; "
                                "CMoE, DIVE, static pruning and a random partition beside it), or "
                                "split the experts of an MoE checkpoint (Qwen2-MoE, Qwen3-MoE, "
                                "Mixtral, OLMoE, ours) again: --experts then counts the "
                                "sub-experts of each expert, --active their active share.",
                                formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="demo",
                   help="HF-style checkpoint directory, or 'demo' for SmolLM2-135M-Instruct or "
                   "'demo-gemma' for Gemma 3 270M (built on first use)")
    helps = lambda field: [s.__dataclass_fields__[field].metadata["help"]
                           for s in (weaver.ConvertSpec, dive.DiveSpec)]
    add_flags(p, weaver.ConvertSpec,  # with DIVE's method and router beside weaver's
              method={"choices": weaver.METHODS + ("dive",), "help": "; ".join(helps("method"))},
              router={"choices": weaver.ROUTERS[:-1] + ("random",),
                      "help": "; ".join(helps("router"))})
    add_flags(p, dive.DiveSpec, only=("dive_groups", "dive_top_k"))
    add_flags(p, DataSpec)
    add_flags(p, RunSpec)
    a = p.parse_args()
    exit_on_sigterm()
    try:
        spec = from_flags(a, spec_class(a.method))
        main(a.checkpoint, spec, from_flags(a, DataSpec), from_flags(a, RunSpec))
    except (ValueError, OSError) as e:  # bad input or a failed download: the message says which
        sys.exit(f"convert.py: error: {e}")
