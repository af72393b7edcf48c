"""data.py: calibration windows from files and written by the model, seeded and held out."""
import json

import pytest
import torch

from data import TASK_PROMPTS, calibration_from_files, calibration_from_model, read_text
from conftest import tiny_model



def test_calibration_from_files(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(
        models.WordLevel({f"w{i}": i for i in range(100)} | {"[UNK]": 100}, unk_token="[UNK]")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "a.txt").write_text(" ".join(f"w{i % 100}" for i in range(1000)))
    (tmp_path / "b.jsonl").write_text(
        "\n".join(json.dumps({"q": f"w{i}", "a": f"w{i + 1}"}) for i in range(90))
    )
    entries = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl") + ":qa"]
    calib = calibration_from_files(tokenizer, entries, samples=3, seqlen=10, seed=0)
    assert (
        calib.tokens.shape == (6, 10)
        and calib.names == ["a", "qa"]
        and calib.task.tolist() == [0] * 3 + [1] * 3
    )
    assert torch.equal(calibration_from_files(tokenizer, entries, 3, 10, 0).tokens, calib.tokens)
    # never from the held-out last 10% of a.txt (tokens 900..999)
    assert calib.tokens[:3].max() < 900 - 1
    with pytest.raises(
        ValueError, match=r"task 'qa' has 16 windows of 10 tokens, fewer than --calib-samples 20"
    ):
        calibration_from_files(tokenizer, entries, samples=20, seqlen=10, seed=0)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="calibration file .*empty.txt is empty"):
        calibration_from_files(tokenizer, [str(tmp_path / "empty.txt")], 1, 10, 0)
    with pytest.raises(FileNotFoundError, match="nope.txt not found"):
        calibration_from_files(tokenizer, [str(tmp_path / "nope.txt")], 1, 10, 0)


def test_generated_calibration_is_seeded():
    model = tiny_model()

    class Tok:  # prompts of different lengths, so the batch needs padding
        def encode(self, text):
            return type("E", (), {"ids": [ord(c) % 60 + 4 for c in text[: len(text) % 5 + 2]]})()
    a = calibration_from_model(model, Tok(), samples=2, seqlen=12, seed=3, log=lambda *_: None)
    b = calibration_from_model(model, Tok(), samples=2, seqlen=12, seed=3, log=lambda *_: None)
    assert a.tokens.shape == (2 * len(TASK_PROMPTS), 12) and torch.equal(a.tokens, b.tokens)
    assert a.names == list(TASK_PROMPTS)
    prompts = [Tok().encode(p).ids for p in TASK_PROMPTS.values()]
    assert len(set(map(len, prompts))) > 1
    # every window starts with its prompt, never with padding
    for row, task in zip(a.tokens, a.task):
        assert row[: len(prompts[task])].tolist() == prompts[task]



def test_read_text_jsonl_fields(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text('{"q": "a", "a": "b"}\n\n{"q": "c", "a": "d"}\n')
    assert read_text(str(file), "q,a") == "a\nb\n\nc\nd"
    assert read_text(str(file)) == "a\nb\n\nc\nd"  # no "text" field: every string field
    with pytest.raises(ValueError, match=r"d.jsonl:1: no field 'text' \(fields: q, a\)"):
        read_text(str(file), "text")
