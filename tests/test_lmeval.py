"""lmeval.py: the zero-shot tasks written as local lm-eval task YAMLs and their data."""
import json

import pytest

import data
import lmeval
import model as modeling
from test_data import write_tasks


def test_lm_eval_tasks_are_written_for_local_files(tmp_path):
    (tmp_path / "eval").mkdir()
    names = lmeval.lm_eval_tasks(write_tasks(tmp_path / "eval"), str(tmp_path / "tasks"))
    assert names == ["ew_piqa", "ew_arc_easy", "ew_sciq", "ew_winogrande"]
    piqa = (tmp_path / "tasks" / "ew_piqa.yaml").read_text()
    assert 'doc_to_text: "Question: {{goal}}\\nAnswer:"' in piqa and "dataset_path: json" in piqa
    docs = [json.loads(line) for line in open(tmp_path / "tasks" / "ew_winogrande.jsonl")]
    assert docs[0]["label"] == 0  # the .lst file's 1, as an index
    arc = json.loads(open(tmp_path / "tasks" / "ew_arc_easy.jsonl").readline())
    assert arc["choices"]["label"].index(arc["answerKey"]) == 0


@pytest.mark.parametrize("runner", ["ours", "transformers"])
def test_compare_reads_lm_evals_logged_samples(tiny_checkpoint, tmp_path, runner, capsys):
    if runner == "transformers":
        pytest.importorskip("transformers")
    eval_dir = write_tasks(tmp_path)
    model = modeling.load_model(tiny_checkpoint)
    tokenizer = modeling.load_tokenizer(tiny_checkpoint)
    samples = tmp_path / "out" / "model"
    samples.mkdir(parents=True)
    for task, (reader, _) in data.TASKS.items():  # what lm-eval logs: one line per item
        item = reader(eval_dir)[0]
        sums = data.choice_logprobs(model, tokenizer, [item])[0]
        if task == "sciq":  # lm-eval, say, picked another choice
            wrong = (item.label + 1) % len(sums)
            sums = [s + 100.0 * (i == wrong) for i, s in enumerate(sums)]
        right = float(data.argmax(sums) == item.label)
        with open(samples / f"samples_ew_{task}_2026.jsonl", "w") as f:
            f.write(json.dumps({"doc_id": 0, "filtered_resps": [[str(s), "False"] for s in sums],
                                "acc": right}) + "\n")
            if task == "piqa":  # lm-eval scored an item past the files' end: not compared
                f.write(json.dumps({"doc_id": 1, "filtered_resps": [], "acc": 1.0}) + "\n")
    rows = {r["task"]: r for r in lmeval.compare_lm_eval(tiny_checkpoint, str(tmp_path / "out"),
                                                         eval_dir, None, runner)}
    assert rows["sciq"]["max_logprob_diff"] == pytest.approx(100.0, abs=1e-3)
    assert rows["sciq"]["correct_lm_eval"] == 0 and rows["sciq"]["acc_differs"] == \
        rows["sciq"]["correct_ours"]
    assert rows["piqa"]["items"] == 1 and rows["piqa"]["correct_lm_eval"] == \
        rows["piqa"]["correct_ours"]
    for task in ("piqa", "arc_easy", "winogrande"):
        assert rows[task]["max_logprob_diff"] < 1e-4 and rows[task]["acc_differs"] == 0
