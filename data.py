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


def read_utf8(file: str) -> str:
    check_file(file)
    try:
        with open(file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start}); give a .txt or .jsonl "
                         f"file") from None


def read_jsonl(file: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a .jsonl file."""
    records = []
    for lineno, line in enumerate(read_utf8(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{lineno}: not a JSON object ({e.msg})") from None
    return records


def read_text(file: str, field: str | None = None) -> str:
    """A .txt file as is, or from a .jsonl file the `field` of every line (comma-separated fields
    joined by a newline; by default "text", or else every string field), documents joined by a blank
    line."""
    if not file.endswith(".jsonl"):
        return read_utf8(file)
    docs = []
    for lineno, record in read_jsonl(file):
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


def bos_of(model) -> int | None:
    """The BOS id a model reads text after where its tokenizer.json does not add it (Gemma), else
    None: each window, prompt and scored context then starts with it."""
    cfg = getattr(model, "cfg", None)  # export.Served has none: a stock model, its own tokenizer
    return cfg.prefix_bos if cfg is not None else None


def calibration_from_files(tokenizer, entries: list[str], samples: int, seqlen: int, seed: int,
                           holdout: float = 0.1, field: str | None = None,
                           bos: int | None = None) -> Calibration:
    """`samples` windows of `seqlen` tokens per task, drawn with the seed from the non-held-out part
    of the task's files (several files may share a task); with bos, each window is it and then
    seqlen - 1 tokens of text."""
    pools: dict[str, list[torch.Tensor]] = {}
    for entry in entries:  # FILE[:TASK]
        file, task = file_and_task(entry)
        text = read_text(file, field)
        if not text.strip():
            raise ValueError(f"calibration file {file} is empty")
        head, _ = split_heldout(tokenizer.encode(text).ids, holdout)
        width = seqlen - (bos is not None)  # tokens of text per window
        n = len(head) // width if width else 0
        if n == 0:
            raise ValueError(f"calibration file {file}: {len(head)} tokens (before the held-out "
                             f"{holdout:.0%}) make no window of --calib-seqlen {seqlen}")
        windows = with_bos(torch.tensor(head[: n * width], dtype=torch.int64).view(n, width), bos)
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


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    # (n, w) int64 -> (n, w + 1) with the BOS column first, or the windows as they are
    if bos is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)


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
    bos = [] if bos_of(model) is None else [bos_of(model)]
    prompts = [(bos + tokenizer.encode(p).ids)[:seqlen] for p in TASK_PROMPTS.values()]
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


# logits held at once, in floats (256 MB in float32): a 262k vocabulary's (Gemma's) windows are
# scored a slice of positions at a time, a 49k one's whole
LOGIT_BUDGET = 1 << 26


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048,
               max_windows: int | None = None,
               batch_size: int = 1) -> tuple[float, float, int]:
    """tokens: (N,) int64 -> (mean NLL, ppl, number of windows). The output projection runs on at
    most LOGIT_BUDGET logits at a time. A model that reads text after a BOS (bos_of) gets it and
    seqlen - 1 tokens per window, all of them predicted."""
    bos = bos_of(model)
    width = seqlen - (bos is not None)  # tokens of text per window
    n_windows = tokens.numel() // width
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"{tokens.numel()} tokens make no window of {seqlen} tokens" +
                         (f" (at most {max_windows} windows)" if max_windows is not None else ""))
    device = model.embed_tokens.weight.device
    windows = with_bos(tokens[: n_windows * width].view(n_windows, width), bos)
    nll_sum, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        batch = windows[i: i + batch_size].to(device)
        h = model.hidden(batch)  # (b, T, D)
        step = max(1, LOGIT_BUDGET // (len(batch) * model.lm_head.weight.shape[0]))
        for s in range(0, seqlen - 1, step):  # positions s.. predict tokens s + 1..
            logits = model.lm_head(h[:, s: s + step]).float()  # (b, step, V)
            n = min(step, seqlen - 1 - s)  # the window's last position predicts nothing
            nll = F.cross_entropy(logits[:, :n].flatten(0, 1), batch[:, s + 1: s + 1 + n].flatten(),
                                  reduction="sum")
            nll_sum += nll.item()
        count += batch[:, 1:].numel()
    mean_nll = nll_sum / count
    return mean_nll, math.exp(mean_nll), n_windows

# -----------------------------------------------------------------------------
# zero-shot multiple choice, scored as lm-eval 0.4 scores it: each choice is a continuation of the
# item's context (" " + the choice), scored by the sum of its tokens' log-probabilities; acc is the
# argmax of that sum, acc_norm the argmax of the sum over the choice's length in characters.
# WinoGrande is scored partially: each option replaces "_", and only the rest of the sentence is
# scored, the same text after either option. Files as ../shared/data/eval holds them.


@dataclass
class Item:
    contexts: list[str]       # one per choice: the same context, but for WinoGrande
    continuations: list[str]  # what is scored after it
    lengths: list[int]        # characters of each choice, for acc_norm
    label: int                # the correct choice


def choice_item(context: str, choices: list[str], label: int) -> Item:
    return Item([context] * len(choices), [" " + c for c in choices], [len(c) for c in choices],
                label)


def read_docs(file: str) -> list[dict]:
    """The records of a .jsonl file, or of a .json file holding a list of them."""
    if file.endswith(".jsonl"):
        return [record for _, record in read_jsonl(file)]
    return json.loads(read_utf8(file))


def read_labels(file: str, n: int) -> list[int]:
    """The labels of n items, one per line."""
    labels = [int(line) for line in read_utf8(file).splitlines() if line.strip()]
    if len(labels) != n:
        raise ValueError(f"{file}: {len(labels)} labels for {n} items")
    return labels


def piqa(directory: str) -> list[Item]:
    docs = read_docs(os.path.join(directory, "piqa_valid.jsonl"))
    labels = read_labels(os.path.join(directory, "piqa_valid-labels.lst"), len(docs))
    return [choice_item(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], label)
            for d, label in zip(docs, labels)]


def arc_easy(directory: str) -> list[Item]:
    items = []
    for d in read_docs(os.path.join(directory, "arc_easy_test.jsonl")):
        choices = d["question"]["choices"]
        label = [c["label"] for c in choices].index(d["answerKey"])
        items.append(choice_item(f"Question: {d['question']['stem']}\nAnswer:",
                                 [c["text"] for c in choices], label))
    return items


def sciq(directory: str) -> list[Item]:
    docs = read_docs(os.path.join(directory, "sciq_test.json"))
    return [choice_item(f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                        [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
                        3) for d in docs]


def winogrande(directory: str) -> list[Item]:
    docs = read_docs(os.path.join(directory, "winogrande_dev.jsonl"))
    labels = read_labels(os.path.join(directory, "winogrande_dev-labels.lst"), len(docs))
    items = []
    for d, label in zip(docs, labels):
        blank = d["sentence"].index("_")
        rest = " " + d["sentence"][blank + 1:].strip()
        options = [d["option1"], d["option2"]]
        items.append(Item([d["sentence"][:blank] + o for o in options], [rest, rest],
                          [len(o) for o in options], label - 1))
    return items


# each task's reader and the metric lm-eval reports as its main one
TASKS = {"piqa": (piqa, "acc_norm"), "arc_easy": (arc_easy, "acc_norm"), "sciq": (sciq, "acc_norm"),
         "winogrande": (winogrande, "acc")}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval encodes a pair: the context's trailing spaces move
    to the continuation; the continuation is what the whole's encoding has past the context's own
    token count, and the model reads the context's own ids before it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context).ids
    continuation_ids = tokenizer.encode(context + continuation).ids[len(context_ids):]
    assert context_ids and continuation_ids, \
        f"{context[-40:]!r} + {continuation[:40]!r}: an empty context or continuation"
    return context_ids, continuation_ids


@torch.no_grad()
def choice_logprobs(model, tokenizer, items: list[Item], batch_tokens: int = 4096,
                    shared_from: int | None = 64, log=None) -> list[list[float]]:
    """Each item's summed log-probability of each continuation, in float32. An item whose choices
    share a context of shared_from tokens or more (SciQ's passages) runs the context once and the
    continuations as rows of a batch on its KV cache; the other requests run longest first,
    right-padded, about batch_tokens tokens per forward (short contexts are cheaper batched than
    shared). A model without our KV cache (no setup_caches, e.g. export.Served), or shared_from
    None, runs every request batched. The output projection runs only where a continuation token
    is predicted."""
    sums = [[0.0] * len(item.contexts) for item in items]
    bos = [] if bos_of(model) is None else [bos_of(model)]
    separate = []  # (item, choice, context ids, continuation ids)
    total = sum(len(item.contexts) for item in items)
    t0, done, shown = time.time(), 0, time.time()
    if not hasattr(model, "setup_caches"):
        shared_from = None

    def progress(n: int) -> None:  # a line every 10 s
        nonlocal done, shown
        done += n
        if log is not None and time.time() - shown > 10:
            shown = time.time()
            log(f"  scored {done}/{total} continuations ({time.time() - t0:.0f}s)")
    for i, item in enumerate(items):
        pairs = [encode_pair(tokenizer, c, x) for c, x in zip(item.contexts, item.continuations)]
        pairs = [(bos + c, x) for c, x in pairs]  # Gemma reads its context after a BOS
        if shared_from is not None and len(set(item.contexts)) == 1 \
                and len(pairs[0][0]) >= shared_from:
            sums[i] = shared_context_logprobs(model, pairs[0][0], [x for _, x in pairs])
            progress(len(pairs))
        else:
            separate += [(i, j, c, x) for j, (c, x) in enumerate(pairs)]
    separate.sort(key=lambda r: -len(r[2]) - len(r[3]))
    device = model.embed_tokens.weight.device
    start = 0
    while start < len(separate):
        T = len(separate[start][2]) + len(separate[start][3]) - 1  # every token but the last
        batch = separate[start: start + max(1, batch_tokens // T)]
        start += len(batch)
        inputs, rows, cols, targets = padded([c + x for _, _, c, x in batch],
                                             [len(c) for _, _, c, _ in batch])
        picked = token_logprobs(model, model.hidden(inputs.to(device))[rows, cols], targets)
        for i, j, _, continuation in batch:
            sums[i][j], picked = sum(picked[: len(continuation)]), picked[len(continuation):]
        progress(len(batch))
    return sums


def padded(sequences: list[list[int]], first: list[int]):
    """Each sequence but its last token as a row of a right-padded batch (b, T) int64, and where
    its tokens from first[b] on are predicted: -> (batch, rows, positions, those tokens)."""
    inputs = torch.zeros(len(sequences), max(map(len, sequences)) - 1, dtype=torch.int64)
    rows, cols, targets = [], [], []
    for b, (ids, f) in enumerate(zip(sequences, first)):
        inputs[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        rows += [b] * (len(ids) - f)
        cols += range(f - 1, len(ids) - 1)
        targets += ids[f:]
    return inputs, rows, cols, targets


def token_logprobs(model, h: torch.Tensor, targets: list[int]) -> list[float]:
    """h (n, D) the final norm's output where each target (n,) is predicted -> their log-probs,
    at most LOGIT_BUDGET logits at a time."""
    step = max(1, LOGIT_BUDGET // model.lm_head.weight.shape[0])
    out = []
    for s in range(0, len(targets), step):
        logp = model.lm_head(h[s: s + step]).float().log_softmax(dim=-1)  # (step, V)
        picked = torch.tensor(targets[s: s + step], device=h.device)
        out += logp[torch.arange(len(picked)), picked].tolist()
    return out


def shared_context_logprobs(model, context: list[int],
                            continuations: list[list[int]]) -> list[float]:
    """The context runs once into a batch-1 KV cache, copied to a row per continuation; each row
    then reads its continuation (right-padded) at the positions after the context."""
    device = model.embed_tokens.weight.device
    C, n, L = len(context), len(continuations), max(map(len, continuations))
    model.setup_caches(1, C + L)
    last = model.hidden(torch.tensor([context], device=device), torch.arange(C, device=device))
    first = token_logprobs(model, last[0, -1:].expand(n, -1), [c[0] for c in continuations])
    sums = list(first)
    if L > 1:
        for block in model.layers:  # the context's keys and values, once per continuation
            cache = block.self_attn.kv_cache
            cache.k = cache.k.expand(n, -1, -1, -1).clone()
            cache.v = cache.v.expand(n, -1, -1, -1).clone()
        inputs, rows, cols, targets = padded(continuations, [1] * n)
        h = model.hidden(inputs.to(device), torch.arange(C, C + L - 1, device=device))
        picked = token_logprobs(model, h[rows, cols], targets)
        for b, c in enumerate(continuations):
            sums[b] += sum(picked[: len(c) - 1])
            picked = picked[len(c) - 1:]
    for block in model.layers:
        block.self_attn.kv_cache = None
    return sums


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error, sample deviation over sqrt(n) (lm-eval's)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima, as numpy


def accuracy(items: list[Item], sums: list[list[float]]) -> dict:
    """acc and acc_norm with their standard errors, and the chance level (1 / choices, averaged)."""
    right = [float(argmax(s) == item.label) for item, s in zip(items, sums)]
    right_norm = [float(argmax([v / length for v, length in zip(s, item.lengths)]) == item.label)
                  for item, s in zip(items, sums)]
    (acc, acc_se), (norm, norm_se) = mean_stderr(right), mean_stderr(right_norm)
    chance = sum(1 / len(item.contexts) for item in items) / len(items)
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": norm, "acc_norm_stderr": norm_se,
            "chance": chance, "items": len(items)}


def score_tasks(model, tokenizer, directory: str, tasks=tuple(TASKS), limit: int | None = None,
                log=print) -> dict[str, dict]:
    """{task: accuracy(...) | {"main": its main metric's name}} on the task files in directory (the
    first `limit` items of each, if given)."""
    results = {}
    for task in tasks:
        reader, main = TASKS[task]
        items = reader(directory)[:limit]
        t0 = time.time()
        sums = choice_logprobs(model, tokenizer, items, log=log)
        results[task] = accuracy(items, sums) | {"main": main}
        r = results[task]
        log(f"  {task}: acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}, acc_norm {r['acc_norm']:.4f} "
            f"+- {r['acc_norm_stderr']:.4f} ({len(items)} items, {time.time() - t0:.0f}s)")
    return results
