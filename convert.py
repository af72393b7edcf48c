"""
convert.py: turn a dense GLU checkpoint into a Mixture-of-Experts checkpoint that model.py loads.

    python convert.py                       # the demo model, ExpertWeaver, 64 experts, 75% active
    python convert.py CHECKPOINT --out moe --calib wiki.txt --calib code.py:code --eval wiki.txt
    python model.py generate moe --prompt "The capital of France is"

Prints one line per layer as it converts (specialisation ratio r, alpha, shared / routed experts, top-k,
expert load on the calibration tokens), the time per stage, and with --eval the dense and MoE
perplexity on the held-out tail of each file. Writes DIR/config.json (with a "moe" section),
DIR/model.safetensors, the tokenizer and DIR/report.json, through a temporary directory renamed into
place at the end.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from model import load_config, load_model, load_tokenizer, perplexity, resolve
from weaver import (METHODS, SHARED_BY, ConvertSpec, active_fraction, calibration_from_files, calibration_from_model,
                    check_dense, check_divisible, convert_checkpoint, heldout_tokens, parse_calib_spec)


def main(checkpoint: str, out: str | None, method: str, router: str | None, experts: int, active: float,
         tau: float, alpha_min: float, alpha_max: float, n_shared: int | None, shared_by: str, kmeans_iters: int,
         k_act: int, dense_layers: list[int], sequential: bool, calib: list[str], calib_samples: int, calib_seqlen: int,
         field: str | None, holdout: float, evals: list[str], eval_seqlen: int, eval_windows: int,
         seed: int, dtype: str | None, save_dtype: str | None, device: str, max_shard_gb: float,
         prompt: str | None = None) -> dict:
    t_start = time.time()
    spec = ConvertSpec(method=method, n_experts=experts, active=active, router=router, tau=tau,
                       alpha_min=alpha_min, alpha_max=alpha_max, n_shared=n_shared, shared_by=shared_by,
                       kmeans_iters=kmeans_iters, k_act=k_act, dense_layers=tuple(dense_layers), sequential=sequential,
                       seed=seed)
    path = resolve(checkpoint)
    cfg, hf_config = load_config(path)
    check_dense(cfg, path)  # before the minutes of calibration, not after
    check_divisible(cfg.ffn_dim, experts)
    for file in [parse_calib_spec(c)[0] for c in calib] + evals:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} not found")
    out = out or os.path.join("out", f"{os.path.basename(os.path.normpath(path))}-{method}-{round(active * 100)}")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, "report.json")):
        raise ValueError(f"--out {out} exists and is not an earlier output of convert.py; choose another path")
    dtype = dtype or source_dtype(hf_config)
    save_dtype = save_dtype or source_dtype(hf_config)
    tokenizer = load_tokenizer(path)

    # the whole dense model is loaded only when needed: to write calibration text, or to evaluate it
    t0 = time.time()
    dense = load_model(path, getattr(torch, dtype), device) if evals or not calib else None
    if calib:
        calibration = calibration_from_files(tokenizer, calib, calib_samples, calib_seqlen, seed, holdout, field)
    else:
        calibration = calibration_from_model(dense, tokenizer, calib_samples, calib_seqlen, seed)
    t_calib = time.time() - t0
    S, T = calibration.tokens.shape
    print(f"calibration: {S} windows x {T} tokens, tasks {', '.join(calibration.names)} ({t_calib:.1f}s)")
    eval_tokens = {f: heldout_tokens(tokenizer, f, holdout, field) for f in evals}
    dense_ppl = {f: evaluate(dense, f, toks, eval_seqlen, eval_windows, "dense") for f, toks in eval_tokens.items()}
    dense_text = greedy(dense, tokenizer, prompt, device) if prompt and dense is not None else None
    del dense

    d_e = cfg.ffn_dim // experts
    print(f"converting {path} layer by layer on {device} in {dtype}: {method}, router {spec.router}, {experts} "
          f"experts of {d_e} neurons, k = {spec.k} active per token ({spec.k / experts:.1%} of the neurons)")
    t0 = time.time()
    report = {"source": path, "spec": asdict(spec),
              "calibration": {"windows": S, "seqlen": T, "tasks": calibration.names, "files": calib}}
    layers = convert_checkpoint(path, out, calibration, spec, getattr(torch, dtype), device, getattr(torch, save_dtype),
                                int(max_shard_gb * 2**30), extra={"report.json": report})
    t_convert = time.time() - t0
    report |= {"convert_seconds": t_convert, "timings": {"calibration": t_calib, **layers["timings"]},
               "layers": layers["layers"], "peak_rss_gib": peak_rss_gib()}
    print("time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items())
          + f"; conversion {t_convert:.1f}s, peak RSS {report['peak_rss_gib']:.2f} GiB")

    moe = load_model(out, getattr(torch, dtype), device)
    report["active_fraction"] = active_fraction(moe.cfg)
    report["eval"] = {}
    if evals:
        moe_ppl = {f: evaluate(moe, f, toks, eval_seqlen, eval_windows, "moe") for f, toks in eval_tokens.items()}
        print(f"held-out perplexity (last {holdout:.0%} of each file, {eval_windows} windows x {eval_seqlen}):")
        for f in evals:
            ratio = moe_ppl[f][1] / dense_ppl[f][1]
            report["eval"][f] = {"dense_ppl": dense_ppl[f][1], "moe_ppl": moe_ppl[f][1], "ratio": ratio,
                                 "windows": moe_ppl[f][2], "seqlen": eval_seqlen}
            print(f"  {os.path.basename(f):32s} dense {dense_ppl[f][1]:8.3f}  moe {moe_ppl[f][1]:8.3f}  x{ratio:.3f}")
    write_json_atomically(os.path.join(out, "report.json"), report)
    print(f"wrote {out} (active fraction {report['active_fraction']:.3f}) in {time.time() - t_start:.1f}s total")
    if prompt:
        if dense_text is not None:  # only when the dense model was loaded anyway
            print(f"dense greedy: {dense_text!r}")
        print(f"moe greedy:   {greedy(moe, tokenizer, prompt, device)!r}")
    return report


def greedy(model, tokenizer, prompt: str, device: str, new_tokens: int = 16) -> str:
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    return tokenizer.decode(model.generate(ids, new_tokens)[0].tolist())


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def write_json_atomically(file: str, content: dict) -> None:
    with open(file + ".tmp", "w") as f:
        json.dump(content, f, indent=2)
    os.replace(file + ".tmp", file)


def evaluate(model, file: str, tokens: torch.Tensor, seqlen: int, windows: int, label: str):
    t0 = time.time()
    result = perplexity(model, tokens, seqlen, windows)
    print(f"  {label} ppl {os.path.basename(file)}: {result[1]:.3f} ({result[2]} windows, {time.time() - t0:.1f}s)")
    return result


def source_dtype(hf_config: dict) -> str:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Convert a dense LLaMA/Qwen/Mistral GLU checkpoint into an MoE checkpoint "
                                "with no training (ExpertWeaver; CMoE, static pruning and random partition beside it).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="demo",
                   help="HF-style checkpoint directory, or 'demo' for SmolLM2-135M-Instruct (built on first use)")
    p.add_argument("--out", default=None, help="output directory (default out/NAME-METHOD-ACTIVE); replaced if it "
                   "holds an earlier output")
    p.add_argument("--method", default="expertweaver", choices=METHODS,
                   help="expertweaver: CV-sized shared expert + balanced k-means; cmoe: CMoE (with its own router); "
                   "static: keep the most active neurons, no routing; random: expertweaver with a random partition")
    p.add_argument("--router", default=None, choices=["centroid", "lsq", "cmoe", "gate", "oracle"],
                   help="override the method's router (expertweaver and random: lsq; cmoe: cmoe). centroid: mean "
                   "gate row (the paper's); lsq: ridge fit to the norm of each expert's output, same "
                   "cost; cmoe: CMoE's representative neurons; gate: full gate projection (costly); oracle: the norm "
                   "of each expert's output (a diagnostic upper bound that costs every routed expert)")
    p.add_argument("--experts", type=int, default=64, help="N_e: experts per layer, shared included; must divide d_ff")
    p.add_argument("--active", type=float, default=0.75, help="fraction of experts (= FFN neurons) each token uses")
    p.add_argument("--tau", type=float, default=0.6, help="CV threshold above which a neuron is specialised")
    p.add_argument("--alpha-min", type=float, default=0.2, help="shared fraction of the most specialised layer")
    p.add_argument("--alpha-max", type=float, default=0.7, help="shared fraction of the least specialised layer")
    p.add_argument("--n-shared", type=int, default=None,
                   help="shared experts in every layer, overriding the method's rule (cmoe default: half of k)")
    p.add_argument("--shared-by", default="contribution", choices=SHARED_BY,
                   help="expertweaver, random, static: which neurons are shared (kept). activation: the paper's mean "
                   "|silu(x W_gate)|; contribution: mean |silu(x W_gate) * (x W_up)|, better on held-out text")
    p.add_argument("--kmeans-iters", type=int, default=50, help="max balanced k-means iterations")
    p.add_argument("--k-act", type=int, default=10, help="cmoe: neurons marked per token (K_a)")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[], help="layer indices to leave dense")
    p.add_argument("--sequential", action="store_true",
                   help="profile each layer on the outputs of the already-converted layers (CMoE's carving) "
                   "instead of the dense ones")
    p.add_argument("--calib", action="append", default=[], metavar="FILE[:TASK]",
                   help="calibration text (.txt, or .jsonl with --field); repeatable; the task defaults to the "
                   "file name. Without it the model writes its own calibration text from built-in prompts")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows per task")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--field", default=None, help=".jsonl field(s) to read, comma-separated (default: 'text', "
                   "or every string field)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="the last fraction of each file's tokens: never calibrated on, the only part --eval reads")
    p.add_argument("--eval", dest="evals", action="append", default=[], metavar="FILE",
                   help="report dense and MoE perplexity on the held-out part of FILE; repeatable")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, default=8, help="evaluation windows per file at most")
    p.add_argument("--seed", type=int, default=0, help="seeds calibration sampling, k-means and the partition")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights while converting and evaluating (default: the source checkpoint's); "
                   "statistics are float32 whatever it is")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the source checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--prompt", default="The capital of France is",
                   help="print the MoE's greedy continuation of this prompt at the end ('' to skip)")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="largest output shard; the converter holds at most one shard in memory")
    a = p.parse_args()
    try:
        main(a.checkpoint, a.out, a.method, a.router, a.experts, a.active, a.tau, a.alpha_min, a.alpha_max,
             a.n_shared, a.shared_by, a.kmeans_iters, a.k_act, a.dense_layers, a.sequential, a.calib, a.calib_samples,
             a.calib_seqlen, a.field, a.holdout, a.evals, a.eval_seqlen, a.eval_windows, a.seed, a.dtype,
             a.save_dtype, a.device, a.max_shard_gb, a.prompt)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message says what and where
        sys.exit(f"convert.py: error: {e}")
