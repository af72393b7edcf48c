"""--format qwen2_moe: transformers loads the export as a stock Qwen2MoeForCausalLM (no code of
ours) and computes our model's function, exactly for softmax routing and within the stated bound for
sum routing; what cannot be exported is refused in one line before any work."""
import json
import math
import os
import types

import pytest
import torch

import convert
import data
import model as modeling
import train
import weaver
from checkpoint import save_checkpoint
from export import EXPORT_EPS, Served, export_problems, export_qwen2_moe, score_bound
from conftest import (assert_same_greedy, convert_main, make_hf, random_calibration, save_hf,
                      tiny_data)

transformers = pytest.importorskip("transformers")

UNIFORM = dict(n_experts=8, active=0.5, n_shared=2, router="lsq", router_bias=False)


def our_moe(hf, tmp_path, routing="sum", **spec):
    """A converted (and, for softmax, re-routed) MoE checkpoint of ours from a transformers
    model."""
    source = save_hf(hf, tmp_path / "dense")
    model = modeling.load_model(source)
    convert.convert_model(
        model,
        random_calibration(model.cfg.vocab_size, samples=4),
        weaver.ConvertSpec(**{**UNIFORM, **spec}),
        log=lambda *_: None,
    )
    if routing != "sum":
        train.set_routing(model, routing, norm_topk=True)
        with torch.no_grad():  # sharpen the router, so the softmax weights differ from one another
            for m in train.moe_layers(model):
                m.router.weight.mul_(20)
    save_checkpoint(model, modeling.load_config(source)[1], str(tmp_path / "ours"))
    return str(tmp_path / "ours"), model


def exported_logits(path, tmp_path, tokens):
    out = str(tmp_path / "qwen2_moe")
    layout = export_qwen2_moe(path, out, torch.float32, log=lambda *_: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        return hf(tokens).logits, layout, hf


@pytest.mark.parametrize("arch", ["llama", "llama3-rope", "llama-tied", "qwen2", "mistral"])
@pytest.mark.parametrize("routing", ["sum", "softmax"])
def test_transformers_computes_the_exported_function(arch, routing, tmp_path):
    overrides = {"llama-tied": {"tie_word_embeddings": True},
                 "mistral": {"sliding_window": None}}.get(arch, {})
    hf = make_hf(arch.removesuffix("-tied"), **overrides)
    path, ours = our_moe(hf, tmp_path, routing, dense_layers=(1,))
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    logits, layout, exported = exported_logits(path, tmp_path, tokens)
    assert layout["dense"] == [1] and layout["top_k"] == 2 and layout["experts"] == 6
    # model.py reads the export back as the stock Qwen2-MoE it is
    back = modeling.load_model(str(tmp_path / "qwen2_moe"))
    assert back.cfg.stock_moe == "qwen2_moe"
    torch.testing.assert_close(back(tokens), logits, atol=1e-5, rtol=0)
    expected = ours(tokens)
    if routing == "softmax":  # the same function: float rounding only
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    else:  # each routed weight within exp(+-2^-12) of 1
        error = (logits - expected).abs().max().item()
        assert error <= 4 * EXPORT_EPS * expected.abs().max().item(), error
    tol = 1e-4 if routing == "softmax" else 4 * EXPORT_EPS * expected.abs().max().item()
    assert_same_greedy(exported.generate(tokens[:1, :4], max_new_tokens=8, do_sample=False),
                       ours.generate(tokens[:1, :4], 8), lambda prefix: ours(prefix)[:, -1], tol)


class Chars:
    """A tokenizer of one id per character, enough for data.py's scorer on a 128-token model."""

    def encode(self, text):
        return types.SimpleNamespace(ids=[ord(c) % 128 for c in text])


def test_served_export_scores_and_measures_as_our_model(tmp_path):
    path, ours = our_moe(make_hf("llama"), tmp_path, "softmax")  # a function the format has
    out = str(tmp_path / "qwen2_moe")
    export_qwen2_moe(path, out, torch.float32, log=lambda *_: None)
    served = Served(out)
    items = [data.Item(["Question: where?\nAnswer:"] * 2, [" here", " over there"], [4, 10], 0),
             data.Item(["The cat sat on the mat", "The dog sat on the mat"], [" today."] * 2,
                       [6, 6], 1)]
    expected = data.choice_logprobs(ours, Chars(), items, shared_from=1)  # on our KV cache
    got = data.choice_logprobs(served, Chars(), items)  # no KV cache of ours: all batched
    assert got == [pytest.approx(e, abs=1e-4) for e in expected]
    tokens = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(0))
    assert data.perplexity(served, tokens, 16)[1] == pytest.approx(
        data.perplexity(ours, tokens, 16)[1], rel=1e-5)


def test_sum_weights_stay_within_the_bound_on_random_scores():
    # the construction alone, on any input of norm <= the bound: every weight within exp(+-eps) of
    # 1, and the same top-k set except where the k-th and (k+1)-th scores are closer than the
    # float32 softmax resolves: its logits span at most eps, so exp tells apart about eps / 2^-24
    # levels of the bound
    g = torch.Generator().manual_seed(0)
    router = modeling.Router("lsq", 16, 12, bias=False)
    router.weight = torch.nn.Parameter(torch.randn(12, 16, generator=g) * 3)
    norm = 5.0
    bound = score_bound(router, norm)
    direction = torch.nn.functional.normalize(torch.randn(4000, 16, generator=g), dim=-1)
    x = direction * norm * torch.rand(4000, 1)
    scores = (x @ router.weight.T).detach()
    top = scores.topk(5, dim=-1)
    picked = (EXPORT_EPS / bound * scores).softmax(dim=-1).topk(4, dim=-1)
    weights = 4 * picked.values / picked.values.sum(dim=-1, keepdim=True)
    assert (weights.log().abs() <= EXPORT_EPS + 1e-6).all()
    assert weights.sub(1).abs().max() > EXPORT_EPS / 100  # the bound is not vacuous here
    same = (picked.indices.sort(dim=1).values == top.indices[:, :4].sort(dim=1).values).all(dim=1)
    resolved = top.values[:, 3] - top.values[:, 4] > 16 * 2.0 ** -24 / EXPORT_EPS * bound
    assert same[resolved].all() and same.float().mean() > 0.95


def test_cmoe_score_bound_holds_and_is_nearly_reached():
    # CMoE scores |(x.u) silu(x.w)| lie in [0, ||u|| ||w|| ||x||^2]: with u = w, an input along
    # one expert's w scores close to that end, another expert's close to 0
    g = torch.Generator().manual_seed(0)
    router = modeling.Router("cmoe", 16, 6)
    w = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:6] * torch.arange(1.0, 7.0)[:, None]
    router.weight, router.up = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    norm = 4.0
    bound = score_bound(router, norm)
    aligned = torch.nn.functional.normalize(w, dim=-1) * norm  # (6, D): along each expert
    x = torch.cat([aligned, torch.nn.functional.normalize(torch.randn(500, 16, generator=g),
                                                          dim=-1) * norm])
    scores = router(x, None).detach()
    spread = (scores.max(dim=1).values - scores.min(dim=1).values).max().item()
    assert spread <= bound and spread > 0.9 * bound


def test_gemma_is_refused_in_one_line():
    from export import export_problems
    cfg = modeling.ModelConfig.from_hf(make_hf("gemma3").config.to_dict())
    problems = export_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith("Gemma 3's block")


def test_refusals_name_the_reason_before_any_work(tmp_path, tiny_checkpoint):
    cases = [(make_hf("qwen3"), {}, "Qwen3's q/k norms"),
             (make_hf("mistral"), {}, "sliding_window 7"),
             (make_hf("llama-bias-tied"), {}, "o_proj a bias")]
    for i, (hf, spec, message) in enumerate(cases):
        path, _ = our_moe(hf, tmp_path / str(i), **spec)
        with pytest.raises(ValueError, match=message):
            export_qwen2_moe(path, str(tmp_path / "never"))
    path, model = our_moe(make_hf("llama"), tmp_path / "scaled")
    train.set_routing(model, "scaled")
    train.add_select_bias(model)
    save_checkpoint(model, modeling.load_config(path)[1], path + "2")
    with pytest.raises(ValueError, match="scaled routing .* no softmax.*; a selection bias"):
        export_qwen2_moe(path + "2", str(tmp_path / "never"))
    # a conversion whose result could not be exported is refused before calibrating
    for spec, message in [(weaver.ConvertSpec(n_experts=8, allocation="cv", router_bias=True),
                           "use --allocation uniform or --n-shared N; the 'lsq' router's "
                           "per-expert bias|--n-shared N.*add --no-router-bias"),
                          (weaver.ConvertSpec(n_experts=8, router_bias=True),
                           "^[^;]*add --no-router-bias$"),
                          (weaver.ConvertSpec(n_experts=8, n_shared=2, router="gate"),
                           "'gate' router does not score"),
                          (weaver.ConvertSpec(method="static", n_experts=8),
                           "static pruning routes nothing")]:
        with pytest.raises(ValueError, match=message):
            convert_main(tiny_checkpoint, str(tmp_path / "never"), spec, format="qwen2_moe")
    assert not os.path.exists(tmp_path / "never")


def test_layer_adaptive_allocations_are_refused_in_one_short_line(tmp_path):
    path, model = our_moe(make_hf("llama", num_hidden_layers=2), tmp_path)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    layer = config["moe"]["layers"][1]  # one more shared expert in layer 1, as the alpha rule gives
    layer.update(shared_neurons=layer["shared_neurons"] + config["moe"]["expert_dim"],
                 routed_experts=layer["routed_experts"] - 1, top_k=layer["top_k"] - 1)
    problems = export_problems(modeling.ModelConfig.from_hf(config))
    expected = "2 routed layers take 2 different top-k of routed experts (1 of 5, 2 of 6)"
    assert len(problems) == 1 and expected in problems[0]
    assert problems[0].endswith("--n-shared N")


def test_demo_export_gives_the_same_greedy_tokens(demo_path, tmp_path):
    model = modeling.load_model(demo_path)
    calib = random_calibration(vocab=model.cfg.vocab_size, samples=2, seqlen=32)
    spec = weaver.ConvertSpec(
        n_experts=64, active=0.75, n_shared=45, router="lsq", router_bias=False
    )
    convert.convert_checkpoint(demo_path, str(tmp_path / "ours"), calib, spec, torch.float32, "cpu",
                         torch.float32, log=lambda *_: None)
    ours = modeling.load_model(str(tmp_path / "ours"))
    tokens = torch.tensor(
        [modeling.load_tokenizer(demo_path).encode("The capital of France is").ids]
    )
    logits, layout, exported = exported_logits(str(tmp_path / "ours"), tmp_path, tokens)
    assert layout["experts"] == 19 and layout["top_k"] == 3 and layout["shared"] == 45 * 24
    error = (logits - ours(tokens)).abs().max().item()
    tol = 4 * EXPORT_EPS * logits.abs().max().item()
    assert error <= tol
    assert_same_greedy(exported.generate(tokens, max_new_tokens=16, do_sample=False),
                       ours.generate(tokens, 16), lambda prefix: ours(prefix)[:, -1], tol)
    assert layout["weight_error_calibration"] == EXPORT_EPS / 2
    assert math.isfinite(layout["weight_error_any_input"])


def test_the_cli_converts_and_exports_in_one_go_leaving_nothing_beside(tiny_checkpoint, tmp_path):
    spec = weaver.ConvertSpec(n_experts=8, active=0.5, n_shared=2, router_bias=False)
    report = convert_main(
        tiny_checkpoint, str(tmp_path / "q"), spec, save_dtype="float32", format="qwen2_moe"
    )
    assert sorted(os.listdir(tmp_path)) == ["q"]  # the intermediate checkpoint of ours is gone
    assert json.load(open(tmp_path / "q" / "config.json"))["model_type"] == "qwen2_moe"
    assert report["export"]["experts"] == 6 and os.path.isfile(tmp_path / "q" / "report.json")
    # ours, then exported
    convert_main(tiny_checkpoint, str(tmp_path / "ours"), spec, save_dtype="float32")
    convert_main(
        str(tmp_path / "ours"),
        str(tmp_path / "q2"),
        spec,
        data=tiny_data(tiny_checkpoint),
        format="qwen2_moe",
    )
    # experts of 6 neurons: rows of 24 bytes, which transformers' default grouped_mm path cannot
    # take on CPU
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q2"),
                                                           dtype=torch.float32,
                                                           experts_implementation="eager")
    tokens = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = hf(tokens).logits
    expected = modeling.load_model(str(tmp_path / "ours"))(tokens)
    assert (got - expected).abs().max() <= 4 * EXPORT_EPS * expected.abs().max()


def test_stock_loaders_refuse_our_own_checkpoint_instead_of_misreading_it(tmp_path):
    # transformers (and vLLM, lm-eval through it) would otherwise load the base model with random
    # FFN weights and a warning table; our own loader reads it, and the old layout too
    path, model = our_moe(make_hf("llama"), tmp_path)
    config = json.load(open(os.path.join(path, "config.json")))
    assert (config["model_type"], config["base_model_type"]) == ("expertweaver", "llama")
    for loader in (transformers.AutoConfig, transformers.AutoModelForCausalLM):
        with pytest.raises(ValueError, match="model type `expertweaver`"):
            loader.from_pretrained(path)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = model(tokens)
    assert torch.equal(modeling.load_model(path)(tokens), expected)
    legacy = {k: v for k, v in config.items() if k != "base_model_type"} | {"model_type": "llama"}
    json.dump(legacy, open(os.path.join(path, "config.json"), "w"))
    assert torch.equal(modeling.load_model(path)(tokens), expected)
