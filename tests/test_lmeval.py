"""lmeval.py: the zero-shot tasks written as local lm-eval task YAMLs and their data."""
import json

import lmeval
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
