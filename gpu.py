"""
gpu.py: every GPU figure RESULTS.md needs, from one prepared command, because GPU time here is
rare and short. The estimate is about 8 minutes on one H100 or H200; it has not yet run on a GPU.

    python gpu.py --out gpu-report          # on a GPU: gpu-report/report.json and report.md
    python gpu.py --dry-run --out DIR       # anywhere: the same steps on tiny shapes, on the CPU

It runs four sections, in this order (--sections picks some):
1. convert: a synthetic LLaMA-3-8B checkpoint (random bf16 weights, written first), converted
   streamed by the default method, with its wall time and peak GPU memory. The demo's shape
   (SmolLM2-135M) is converted the same way, for the next two sections.
2. decode: tokens/s at batch 1 and 16 for both models, dense against MoE, each MoE layer's
   forward compiled.
3. ffn: one FFN layer at LLaMA-3-8B's shape, bf16, at f = 0.5 and 0.75 and T = 1, 16, 128 and
   2048. The dense layer runs against each kernel path, compiled, with the roofline's ideal
   (bench.py ffn).
4. train: training tokens/s and MFU at the demo's shape, dense against MoE. Every parameter
   learns, the MoE with softmax routing and the balance loss, under FSDP2 on one GPU.

The weights are random because speed does not depend on their values, and the device machine
reaches no model hub. The training text is random words of a word-level tokenizer written beside
the weights. MFU counts 6 FLOPs per active matmul parameter per token, plus attention's
12 * layers * dim * seqlen (PaLM's formula). It is computed against the GPU's dense bf16 peak
(PEAK_FLOPS).

Imports bench.py (the FFN bench, synthetic checkpoints, the streamed conversion), kernels.py,
model.py, train.py and flags.py (--help).
"""
import json
import os
import statistics
import sys
import time

import torch

import bench
import kernels
import train
from model import Transformer, load_config, load_model

# dense bf16 tensor-core peak, FLOP/s, by a name torch.cuda.get_device_name() contains
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

# what each run measures: the GPU's plan, and the dry run's tiny one (CPU, float32, eager)
PLANS = {
    "gpu": dict(big="llama3-8b", small="smollm2-135m", ffn_shape="llama3-8b", device="cuda",
                dtype="bfloat16", compile=True, actives=[0.5, 0.75], tokens=[1, 16, 128, 2048],
                paths=["gather", "grouped"], batches=[1, 16], new_tokens=32, samples=32,
                calib_seqlen=512, train_steps=20, seqlen=2048, batch=8, min_time=0.5),
    "dry": dict(big="tiny", small="tiny", ffn_shape="demo", device="cpu", dtype="float32",
                compile=False, actives=[0.5], tokens=[1, 16], paths=["gather"], batches=[1, 2],
                new_tokens=4, samples=4, calib_seqlen=32, train_steps=2, seqlen=32, batch=2,
                min_time=0.01),
}
SECTIONS = ("convert", "decode", "ffn", "train")

# -----------------------------------------------------------------------------
# synthetic checkpoints: random weights with a real model's shapes, a word-level tokenizer, text


def word_tokenizer(directory: str, vocab: int) -> None:
    """tokenizer.json mapping the words w0 .. w{vocab - 1} to their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def random_text(file: str, vocab: int, words: int) -> str:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (words,), generator=g).tolist()
    with open(file, "w") as f:
        f.write(" ".join(f"w{i}" for i in ids))
    return file


def dense_and_moe(name: str, work: str, plan: dict) -> tuple[str, str, dict | None]:
    """The synthetic dense checkpoint and its conversion, written under `work` unless there
    already. -> (dense path, MoE path, the conversion's figures when it ran now)."""
    dense = os.path.join(work, f"{name}-all")
    if not os.path.isfile(os.path.join(dense, "config.json")):
        bench.synth_checkpoint(name, None, dense)
        word_tokenizer(dense, bench.SYNTH_CONFIGS[name]["vocab_size"])
    moe = dense + "-moe"
    if os.path.isfile(os.path.join(moe, "config.json")):
        return dense, moe, None
    cuda = plan["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row = bench.convert_bench(name, None, work, plan["samples"], plan["calib_seqlen"], tasks=2,
                              device=plan["device"], dtype=plan["dtype"], keep=True)
    row["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return dense, moe, row

# -----------------------------------------------------------------------------
# decode: tokens/s of a model, each MoE layer's forward compiled


def decode_rate(model, batch: int, new_tokens: int, device: str, compile: bool,
                min_time: float) -> float:
    """Tokens/s of `batch` sequences decoding `new_tokens` each after a 16-token prompt."""
    kernels.use_kernels(model, compile=compile)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, 17), generator=g).to(device)
    seconds = bench.decode_seconds(model, model, prompt, new_tokens, device, min_time)
    return batch * new_tokens / seconds


def decode_rows(models: dict, plan: dict) -> list[dict]:
    rows = []
    for name, (dense, moe) in models.items():
        rate = {}  # (kind, batch) -> tok/s; each model loaded once
        for kind, path in (("dense", dense), ("moe", moe)):
            model = load_model(path, getattr(torch, plan["dtype"]), plan["device"])
            for batch in plan["batches"]:
                rate[kind, batch] = decode_rate(model, batch, plan["new_tokens"], plan["device"],
                                                plan["compile"], plan["min_time"])
            del model
        for batch in plan["batches"]:
            d, m = rate["dense", batch], rate["moe", batch]
            rows.append({"model": name, "batch": batch, "dense_tok_s": d, "moe_tok_s": m,
                         "speedup": m / d})
            print(f"decode {name} batch {batch}: dense {d:.1f} tok/s, MoE {m:.1f} tok/s, "
                  f"x{m / d:.2f}", flush=True)
    return rows

# -----------------------------------------------------------------------------
# train: tokens/s and MFU, every parameter learning, FSDP2 on one GPU


def matmul_parameters(cfg) -> int:
    """Weights a token multiplies by, in a model of this config: every parameter but the embedding
    lookup (unless the output head is tied to it) and, per MoE layer, the routed experts it does
    not pick."""
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())
    if not cfg.tie_embeddings:
        n -= model.embed_tokens.weight.numel()
    for block in model.layers:
        experts, top_k = getattr(block.mlp, "experts", None), getattr(block.mlp, "top_k", 0)
        if experts is not None and top_k:
            n_experts = experts.gate_up_proj.shape[0]
            routed = sum(p.numel() for p in experts.parameters())
            n -= routed * (n_experts - top_k) // n_experts
    return n


def peak_flops(device: str) -> tuple[float | None, str]:
    if not device.startswith("cuda"):
        return None, f"MFU skipped: no peak FLOP rate for {device}"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops, ""
    return None, f"MFU skipped: no dense bf16 peak known for {name} (gpu.py PEAK_FLOPS)"


def train_rows(dense: str, moe: str, work: str, plan: dict) -> tuple[list[dict], str]:
    vocab = load_config(dense)[0].vocab_size
    # enough windows for every step, and 10% held out (train.py's --holdout) for a validation one
    words = ((plan["train_steps"] + 2) * plan["batch"] + 10) * plan["seqlen"] * 10 // 9
    text = random_text(os.path.join(work, "train.txt"), vocab, words)
    peak, skipped = peak_flops(plan["device"])
    rows = []
    for kind, path in (("dense", dense), ("moe", moe)):
        moe_only = dict(routing="softmax", balance=0.01) if kind == "moe" else {}
        spec = train.TrainSpec(data=(text,), train=("all",), steps=plan["train_steps"],
                               seqlen=plan["seqlen"], batch=plan["batch"], warmup=2, **moe_only)
        run = train.RunSpec(device=plan["device"], parallel="fsdp", val_seqlen=plan["seqlen"],
                            val_windows=1, val_every=10**9, log_every=10**9)
        log = train.train(path, os.path.join(work, f"trained-{kind}"), spec, run,
                          log=lambda *_: None)
        rates = [r["tok_s"] for r in log if "tok_s" in r]
        tok_s = statistics.median(rates[2:] or rates)  # after two steps of allocator warm-up
        cfg = load_config(path)[0]
        per_token = 6 * matmul_parameters(cfg) + 12 * cfg.n_layers * cfg.dim * plan["seqlen"]
        mfu = per_token * tok_s / peak if peak else None
        rows.append({"model": kind, "tok_s": tok_s, "flops_per_token": per_token, "mfu": mfu})
        print(f"train {kind}: {tok_s:.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else ""),
              flush=True)
    return rows, skipped

# -----------------------------------------------------------------------------
# the report


def markdown(report: dict) -> str:
    lines = [f"# GPU report: {report['device']}", "", f"`{report['command']}`, torch "
             f"{report['torch']}, {report['seconds']:.0f} s", ""]
    lines += [f"- {line}" for line in report["skipped"]] + [""]
    if report.get("convert"):
        lines += ["| conversion | layers | seconds | peak GPU GiB | peak RSS GiB |",
                  "|---|---|---|---|---|"]
        for r in report["convert"]:
            gpu = f"{r['peak_gpu_gib']:.1f}" if r["peak_gpu_gib"] is not None else "-"
            lines.append(f"| {r['model']} | {r['layers']} | {r['seconds']:.1f} | {gpu} | "
                         f"{r['peak_rss_gib']:.1f} |")
        lines.append("")
    if report.get("decode"):
        lines += ["| decode | batch | dense tok/s | MoE tok/s | MoE / dense |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch']} | {r['dense_tok_s']:.1f} | {r['moe_tok_s']:.1f} "
                  f"| {r['speedup']:.2f}x |" for r in report["decode"]]
        lines.append("")
    if report.get("ffn"):
        lines += ["| FFN shape | f | T | path | dense ms | MoE ms | speedup | ideal |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['active']} | {r['T']} | {r['path']} | {r['dense_ms']:.3f} "
                  f"| {r['moe_ms']:.3f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x |"
                  for r in report["ffn"]]
        lines.append("")
    if report.get("train"):
        lines += ["| training | tok/s | FLOPs/token | MFU |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['tok_s']:.0f} | {r['flops_per_token']:.3g} | "
                  + (f"{r['mfu']:.1%}" if r["mfu"] is not None else "-") + " |"
                  for r in report["train"]]
        lines.append("")
    return "\n".join(lines + [f"- {line}" for line in report["targets"]]) + "\n"


def targets(report: dict) -> list[str]:
    """The issue's speed targets, each said met or not, where this run measured it."""
    lines = []
    ffn = report.get("ffn") or []
    best = lambda f, T: max((r["speedup"] for r in ffn if r["active"] == f and r["T"] == T),
                            default=None)
    for T, goal in ((1, 1.7), (2048, 1.6)):
        if best(0.5, T) is not None:
            lines.append(f"FFN f = 0.5, T = {T}: {best(0.5, T):.2f}x on the best path (target "
                         f">= {goal}x): {'met' if best(0.5, T) >= goal else 'NOT met'}")
    slow = sorted({r["T"] for r in ffn if r["active"] == 0.75 and best(0.75, r["T"]) < 1})
    if any(r["active"] == 0.75 for r in ffn):
        lines.append("FFN f = 0.75 never slower than dense on the best path: "
                     + (f"NOT met at T = {slow}" if slow else "met"))
    for r in report.get("convert") or []:
        if r["model"] == "llama3-8b":
            lines.append(f"8B conversion {r['seconds']:.0f} s (target <= 120 s): "
                         f"{'met' if r['seconds'] <= 120 else 'NOT met'}")
    return lines


def main(out: str, dry_run: bool, sections: tuple) -> dict:
    plan = PLANS["dry" if dry_run else "gpu"]
    skipped = []
    if dry_run:
        skipped.append("dry run: tiny shapes on the CPU in float32, nothing compiled; its "
                       "figures check the steps, not the speed")
    elif not torch.cuda.is_available():
        raise ValueError(f"this torch ({torch.__version__}) sees no CUDA GPU: run with --dry-run")
    device = plan["device"]
    work = os.path.join(out, "work")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda")
              else bench.header(device, plan["dtype"]), "torch": torch.__version__,
              "command": " ".join(["python gpu.py", *sys.argv[1:]]), "plan": plan}
    models, converted = {}, []
    for name in dict.fromkeys([plan["small"], plan["big"]]):
        dense, moe, row = dense_and_moe(name, work, plan)
        models[name] = (dense, moe)
        converted += [row] if row and "convert" in sections else []
    report["convert"] = converted
    if "decode" in sections:
        report["decode"] = decode_rows(models, plan)
    if "ffn" in sections:
        report["ffn"] = bench.ffn_bench(device, plan["dtype"], [plan["ffn_shape"]],
                                        plan["actives"], plan["tokens"], ["router"], 64,
                                        plan["compile"], plan["min_time"], paths=plan["paths"])
    if "train" in sections:
        report["train"], reason = train_rows(*models[plan["small"]], work, plan)
        skipped += [reason] if reason else []
    report["seconds"] = time.time() - t0
    report["skipped"], report["targets"] = skipped, targets(report)
    for line in skipped:
        print(line)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(report))
    print(f"wrote {out}/report.json and report.md in {report['seconds']:.0f} s")
    return report


if __name__ == "__main__":
    import argparse

    from flags import HelpFormatter

    p = argparse.ArgumentParser(description="Every GPU figure RESULTS.md needs, in one run.",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="gpu-report", help="directory for report.json, report.md and "
                   "the synthetic checkpoints (work/, about 35 GB on a GPU run)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks every "
                   "step in well under a minute, measures nothing worth reporting")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help="which measurements to run (the checkpoints are written whenever "
                   "missing)")
    a = p.parse_args()
    try:
        main(a.out, a.dry_run, tuple(a.sections))
    except (ValueError, OSError) as e:
        sys.exit(f"gpu.py: error: {e}")
