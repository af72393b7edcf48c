"""
data.py: the text every script reads. Calibration windows (from files, or written by the model
itself), each file's held-out tail, and perplexity on it, by the protocol GPTQ and CMoE use.

    python bench.py ppl CHECKPOINT FILE --seqlen 1024    # perplexity of a checkpoint on a file

A text file is a .txt read as is, or a .jsonl whose field(s) are read. The last --holdout of each
file's tokens is never calibrated or trained on: it is the only part evaluation reads. Imports
nothing of ours (a model is anything with embed_tokens and generate, as model.py's Transformer).
Read top to bottom: reading files, calibration, held-out text and perplexity.
"""
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# reading text files



def check_file(file: str) -> None:
    if os.path.isdir(file):
        raise IsADirectoryError(f"{file} is a directory: give a text file (.txt or .jsonl); "
                                f"repeat the flag for several")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} not found")


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


def file_and_task(entry: str) -> tuple[str, str]:
    """FILE[:TASK] -> (file, task); the task defaults to the file name up to its first dot."""
    file, task = entry, None
    if not os.path.exists(entry) and ":" in entry:
        file, task = entry.rsplit(":", 1)
    return file, task or os.path.basename(file).split(".")[0]


def split_heldout(ids: list[int], holdout: float) -> tuple[list[int], list[int]]:
    """A file's tokens -> (calibration part, held-out tail). Evaluation only ever reads the tail."""
    n_tail = int(len(ids) * holdout)
    return ids[: len(ids) - n_tail], ids[len(ids) - n_tail:]

# -----------------------------------------------------------------------------
# calibration text: windows of tokens, each labelled with its task



@dataclass
class Calibration:
    tokens: torch.Tensor    # (S, T) int64: S windows of T tokens
    task: torch.Tensor      # (S,) int64: index into names
    names: list[str]


def calibration_from_files(tokenizer, entries: list[str], samples: int, seqlen: int, seed: int,
                           holdout: float = 0.1, field: str | None = None) -> Calibration:
    """`samples` windows of `seqlen` tokens per task, drawn with the seed from the non-held-out part
    of the task's files (several files may share a task)."""
    pools: dict[str, list[torch.Tensor]] = {}
    for entry in entries:  # FILE[:TASK]
        file, task = file_and_task(entry)
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


def calibration_from_model(model, tokenizer, samples: int, seqlen: int, seed: int,
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
# held-out text and perplexity by the GPTQ / CMoE protocol: documents joined by "\n\n", tokenized
# once, cut into non-overlapping windows of seqlen tokens, the remainder dropped; mean NLL over
# every window



def heldout_tokens(tokenizer, file: str, holdout: float, field: str | None = None) -> torch.Tensor:
    ids = tokenizer.encode(read_text(file, field)).ids
    tail = split_heldout(ids, holdout)[1] if holdout > 0 else ids
    return torch.tensor(tail, dtype=torch.int64)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048,
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
