"""data.py: calibration windows from files and written by the model, seeded and held out; the
zero-shot tasks read and scored as lm-eval scores them."""
import json
import os

import pytest
import torch

import data
import model as modeling
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


def test_a_model_that_reads_after_bos_gets_it_first(tmp_path):
    # Gemma's tokenizer.json adds no BOS, but the model reads text after one: every calibration
    # window, perplexity window, prompt and scored context starts with it
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "a.txt").write_text(" ".join(f"w{5 + i % 50}" for i in range(400)))
    calib = calibration_from_files(tokenizer, [str(tmp_path / "a.txt")], 3, 10, 0, bos=2)
    assert calib.tokens.shape == (3, 10) and (calib.tokens[:, 0] == 2).all()
    assert (calib.tokens[:, 1:] >= 5).all()
    model = tiny_model("gemma3_text")
    model.cfg.bos_first, model.cfg.bos_token_id = True, 2
    tokens = torch.randint(5, 64, (3 * 7 + 2,), generator=torch.Generator().manual_seed(0))
    nll, _, n = data.perplexity(model, tokens, seqlen=8)
    windows = torch.cat([torch.full((3, 1), 2), tokens[:21].view(3, 7)], dim=1)
    expected = torch.nn.functional.cross_entropy(model(windows)[:, :-1].flatten(0, 1),
                                                 windows[:, 1:].flatten())
    assert n == 3 and nll == pytest.approx(expected.item(), abs=1e-5)
    item = data.Item(["w7 w8"], [" w9"], [3], 0)
    with torch.no_grad():
        logp = model(torch.tensor([[2, 7, 8]]))[0, -1].log_softmax(-1)[9].item()
    assert data.choice_logprobs(model, tokenizer, [item])[0][0] == pytest.approx(logp, abs=1e-5)

    class Tok:  # a newline to pad with
        def encode(self, text):
            return type("E", (), {"ids": [ord(c) % 50 + 5 for c in text[:4]]})()
    generated = calibration_from_model(model, Tok(), 1, 12, 0, log=lambda *_: None)
    assert (generated.tokens[:, 0] == 2).all()


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


# ---- zero-shot multiple choice, as lm-eval scores it

SUPPORT = ("Mercury is the planet nearest the sun. It has no moons and almost no atmosphere, so "
           "its surface swings from very hot in the day to very cold at night. Venus, the next "
           "planet out, is wrapped in thick clouds of sulfuric acid and is the hottest planet.")


def write_tasks(directory):
    """One item of each task, in the layouts of ../shared/data/eval."""
    piqa = {"goal": "Keep bread fresh", "sol1": "Store it in a bag.", "sol2": "Store it in water."}
    (directory / "piqa_valid.jsonl").write_text(json.dumps(piqa) + "\n")
    (directory / "piqa_valid-labels.lst").write_text("0\n")
    (directory / "arc_easy_test.jsonl").write_text(json.dumps(
        {"id": "x", "question": {"stem": "What melts ice?", "choices": [
            {"text": "heat", "label": "1"}, {"text": "cold", "label": "2"},
            {"text": "dark", "label": "3"}]}, "answerKey": "1"}) + "\n")
    (directory / "sciq_test.json").write_text(json.dumps([
        {"question": "Which planet is nearest the sun?", "distractor1": "Venus",
         "distractor2": "Mars", "distractor3": "Earth", "correct_answer": "Mercury",
         "support": "  " + SUPPORT}]))
    (directory / "winogrande_dev.jsonl").write_text(json.dumps(
        {"sentence": "The cup fell off the table because _ was too close to the edge.",
         "option1": "the cup", "option2": "the table", "answer": "1"}) + "\n")
    (directory / "winogrande_dev-labels.lst").write_text("1\n")
    return str(directory)


def test_task_files_read_with_lm_evals_prompts(tmp_path):
    d = write_tasks(tmp_path)
    piqa, arc, sciq, wino = (data.TASKS[t][0](d)[0] for t in data.TASKS)
    assert piqa == data.Item(["Question: Keep bread fresh\nAnswer:"] * 2,
                             [" Store it in a bag.", " Store it in water."], [18, 18], 0)
    assert arc.contexts[0] == "Question: What melts ice?\nAnswer:" and arc.label == 0
    assert arc.continuations == [" heat", " cold", " dark"] and arc.lengths == [4, 4, 4]
    assert sciq.contexts[0] == SUPPORT + "\nQuestion: Which planet is nearest the sun?\nAnswer:"
    assert sciq.continuations[3] == " Mercury" and sciq.label == 3
    assert wino == data.Item(["The cup fell off the table because the cup",
                              "The cup fell off the table because the table"],
                             [" was too close to the edge."] * 2, [7, 9], 0)


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tiny_checkpoint):
    tokenizer = modeling.load_tokenizer(tiny_checkpoint)
    assert data.encode_pair(tokenizer, "w1 w2 ", "w3 w4") == ([1, 2], [3, 4])
    assert data.encode_pair(tokenizer, "w1", " w3") == ([1], [3])


def test_accuracy_metrics_and_ties():
    items = [data.Item(["c"] * 2, [" a", " bb"], [1, 2], 0),
             data.Item(["c"] * 4, [" a", " b", " c", " dddd"], [1, 1, 1, 4], 3),
             data.Item(["c"] * 2, [" a", " b"], [1, 1], 1)]
    sums = [[-1.0, -1.5],            # acc right; per character -1 vs -0.75: acc_norm wrong
            [-3.0, -2.0, -2.0, -4.0],  # acc picks choice 1 (the first of the tied best); norm: 3
            [-2.0, -2.0]]            # a tie: the first choice, wrong
    r = data.accuracy(items, sums)
    assert (r["acc"], r["acc_norm"]) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert r["acc_stderr"] == pytest.approx((1 / 3) ** 0.5 / 3 ** 0.5)  # sd of (1, 0, 0) / sqrt 3
    assert r["chance"] == pytest.approx((1 / 2 + 1 / 4 + 1 / 2) / 3) and r["items"] == 3


def test_choice_logprobs_match_transformers_on_the_demo(demo_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    ours, tokenizer = modeling.load_model(demo_path), modeling.load_tokenizer(demo_path)
    items = [data.TASKS[t][0](write_tasks(tmp_path))[0] for t in data.TASKS]
    for shared_from in (1, 10**9):  # contexts on a shared KV cache, or batched with the rest
        got = data.choice_logprobs(ours, tokenizer, items, shared_from=shared_from)
        for item, sums in zip(items, got):
            for context, continuation, value in zip(item.contexts, item.continuations, sums):
                c, x = data.encode_pair(tokenizer, context, continuation)
                with torch.no_grad():
                    logp = hf(torch.tensor([c + x])).logits[0].float().log_softmax(dim=-1)
                expected = sum(logp[len(c) - 1 + k, t].item() for k, t in enumerate(x))
                assert value == pytest.approx(expected, abs=1e-4)


def test_the_shared_eval_files_parse(data_dir):
    counts = {t: len(data.TASKS[t][0](os.path.join(data_dir, "eval"))) for t in data.TASKS}
    assert counts == {"piqa": 1838, "arc_easy": 2376, "sciq": 1000, "winogrande": 1267}
