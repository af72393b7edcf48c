"""generate.py: the prompt CLI refuses bad flags before loading, and starts an empty prompt from
the beginning-of-text token."""
import pytest
import torch

import generate
import model as modeling



def test_cli_refuses_bad_flags_before_loading(tiny_checkpoint):
    path = tiny_checkpoint
    ok = dict(prompt="w1 w2", max_new_tokens=4, temperature=0.0, top_k=None, seed=0,
              dtype="float32", device="cpu")
    for bad, message in [(dict(max_new_tokens=-1), "--max-new-tokens -1 must be at least 1"),
                         (dict(top_k=0), "--top-k 0 must be at least 1"),
                         (dict(temperature=-1.0), "--temperature -1.0 must be 0 .greedy. or"),
                         (dict(device="cuda:7"), "--device cuda:7: this torch .* sees no CUDA"),
                         (dict(device="gpu"), "--device 'gpu' is not a torch device"),
                         (dict(max_new_tokens=2047),
                          "2 tokens \\+ --max-new-tokens 2047 exceed the model's "
                          "max_position_embeddings 2048")]:
        if "cuda" in bad.get("device", "") and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=message):
            generate.main(path, **{**ok, **bad})


def test_cli_continues_an_empty_prompt_from_bos_and_reads_demo(demo_path):
    empty = generate.main("demo", "", 4, 0.0, None, 0, "float32", "cpu")
    assert isinstance(empty, str) and empty
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 8192"):
        modeling.load_model(demo_path).generate(torch.zeros(1, 8190, dtype=torch.int64), 3)
