"""
lmeval.py: lm-eval as a client. The zero-shot tasks of data.py written as local lm-eval task YAMLs,
so that `lm_eval --include_path` scores the same items from the same files with nothing from a hub,
and our scorer checked against lm-eval's logged samples, item for item.

    python lmeval.py tasks --out ew-tasks
    lm_eval --model hf --model_args pretrained=CHECKPOINT,dtype=float32,prefix_token_id=1 \\
        --include_path ew-tasks --tasks ew_piqa,ew_arc_easy,ew_sciq,ew_winogrande \\
        --limit 100 --log_samples --output_path lmeval-out
    python lmeval.py compare CHECKPOINT lmeval-out --limit 100
    python lmeval.py compare EXPORT lmeval-out --limit 100 --runner transformers

Imports data.py (the task readers and the scorer), model.py (loading), export.py (an export run
by transformers) and flags.py (--help). lm-eval itself lives in a venv of its own (README.md).
"""
import glob
import json
import os
import sys

import torch

from data import TASKS, argmax, choice_logprobs, read_docs, read_labels
from export import Served
from model import load_model, load_tokenizer

EVAL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "eval")

# name -> (the data file's fields, lm-eval's prompt, target and choices, its metrics)
LM_EVAL_TASKS = {
    "piqa": ('doc_to_text: "Question: {{goal}}\\nAnswer:"', "doc_to_target: label",
             'doc_to_choice: "{{[sol1, sol2]}}"', ("acc", "acc_norm")),
    "arc_easy": ('doc_to_text: "Question: {{question}}\\nAnswer:"',
                 'doc_to_target: "{{choices.label.index(answerKey)}}"',
                 'doc_to_choice: "{{choices.text}}"', ("acc", "acc_norm")),
    "sciq": ('doc_to_text: "{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:"',
             "doc_to_target: 3",
             'doc_to_choice: "{{[distractor1, distractor2, distractor3, correct_answer]}}"',
             ("acc", "acc_norm")),
    # partial scoring: the gold option's index as the text, each option in place of "_" as the
    # contexts, the rest of the sentence as the one continuation
    "winogrande": ('doc_to_text: "{{label}}"',
                   "doc_to_target: \"{{sentence[sentence.index('_') + 1:].strip()}}\"",
                   "doc_to_choice: \"{{[sentence[:sentence.index('_')] + option1, "
                   "sentence[:sentence.index('_')] + option2]}}\"", ("acc",)),
}


def lm_eval_tasks(eval_dir: str, out: str) -> list[str]:
    """Writes out/ew_TASK.jsonl (the task's items, labels joined in, in lm-eval's field names) and
    out/ew_TASK.yaml for every task; -> the task names for lm_eval --tasks."""
    os.makedirs(out, exist_ok=True)
    read = lambda name: read_docs(os.path.join(eval_dir, name))

    def labelled(name: str, labels: str, shift: int) -> list[dict]:  # the .lst labels, as indices
        docs = read(name)
        ys = read_labels(os.path.join(eval_dir, labels), len(docs))
        return [d | {"label": y - shift} for d, y in zip(docs, ys)]
    docs = {
        "piqa": labelled("piqa_valid.jsonl", "piqa_valid-labels.lst", 0),
        "arc_easy": [{"question": d["question"]["stem"], "answerKey": d["answerKey"],
                      "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                                  "label": [c["label"] for c in d["question"]["choices"]]}}
                     for d in read("arc_easy_test.jsonl")],
        "sciq": read("sciq_test.json"),
        "winogrande": labelled("winogrande_dev.jsonl", "winogrande_dev-labels.lst", 1),
    }
    names = []
    for task, (text, target, choice, metrics) in LM_EVAL_TASKS.items():
        name = f"ew_{task}"
        file = os.path.abspath(os.path.join(out, f"{name}.jsonl"))
        with open(file, "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs[task])
        with open(os.path.join(out, f"{name}.yaml"), "w") as f:
            f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                    f"    test: {file}\ntest_split: test\noutput_type: multiple_choice\n"
                    f"{text}\n{target}\n{choice}\nmetric_list:\n"
                    + "".join(f"  - metric: {m}\n" for m in metrics))
        names.append(name)
    return names


def compare_lm_eval(checkpoint: str, samples: str, eval_dir: str, limit: int | None,
                    runner: str = "ours") -> list[dict]:
    """Our scorer against lm-eval's logged samples (lm_eval --log_samples --output_path samples) on
    the same items: the largest difference of a summed log-probability, and the items whose acc
    differs. runner: the model our scorer runs, model.py's ("ours") or transformers' (an export
    such as Qwen2-MoE, which model.py does not read)."""
    model = load_model(checkpoint) if runner == "ours" else Served(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    rows = []
    for task, (reader, _) in TASKS.items():
        files = glob.glob(os.path.join(samples, "**", f"samples_ew_{task}_*.jsonl"), recursive=True)
        if not files:
            raise ValueError(f"{samples}: no samples_ew_{task}_*.jsonl (lm_eval --log_samples)")
        logged = sorted((json.loads(line) for line in open(files[0])), key=lambda s: s["doc_id"])
        items = reader(eval_dir)[:limit][: len(logged)]
        logged = logged[: len(items)]  # a --limit below lm_eval's compares its first items only
        ours = choice_logprobs(model, tokenizer, items)
        theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in logged]
        diff = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
        right = [float(argmax(x) == it.label) for x, it in zip(ours, items)]
        differ = sum(r != s["acc"] for r, s in zip(right, logged))
        rows.append({"task": task, "items": len(items), "max_logprob_diff": diff,
                     "acc_differs": differ, "correct_ours": int(sum(right)),
                     "correct_lm_eval": int(sum(s["acc"] for s in logged))})
        print(f"{task}: {len(items)} items, largest |summed log-prob difference| {diff:.1e}, acc "
              f"differs on {differ}; correct: ours {rows[-1]['correct_ours']}, lm-eval "
              f"{rows[-1]['correct_lm_eval']}")
    return rows


if __name__ == "__main__":
    import argparse

    from flags import HelpFormatter

    defaults = HelpFormatter
    p = argparse.ArgumentParser(description="lm-eval as a client: local task YAMLs, and our scorer "
                                "against lm-eval's logged samples.", formatter_class=defaults)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tasks", help="the zero-shot tasks as local lm-eval task YAMLs",
                       formatter_class=defaults)
    t.add_argument("--eval-dir", default=EVAL_DIR, help="the task files (../shared/data/eval)")
    t.add_argument("--out", required=True, help="directory for the YAMLs and their data")
    c = sub.add_parser("compare", help="our scorer against lm-eval's logged samples",
                       formatter_class=defaults)
    c.add_argument("checkpoint", help="the checkpoint lm-eval scored (ours, or an export)")
    c.add_argument("samples", help="lm_eval's --output_path, run with --log_samples")
    c.add_argument("--eval-dir", default=EVAL_DIR, help="the task files (../shared/data/eval)")
    c.add_argument("--limit", type=int, default=None, help="lm_eval's --limit")
    c.add_argument("--runner", choices=("ours", "transformers"), default="ours",
                   help="the model our scorer runs: model.py's, or transformers' for an export "
                   "(--format qwen2_moe)")
    a = p.parse_args()
    try:
        if a.command == "tasks":
            names = lm_eval_tasks(a.eval_dir, a.out)
            print(f"wrote {', '.join(names)} into {a.out}: lm_eval --include_path {a.out} "
                  f"--tasks {','.join(names)}")
        else:
            torch.set_grad_enabled(False)
            compare_lm_eval(a.checkpoint, a.samples, a.eval_dir, a.limit, a.runner)
    except (ValueError, OSError) as e:  # bad input: the message names it
        sys.exit(f"lmeval.py: error: {e}")
