"""budget.py: the allocation is the exact optimum, the loss curves are built from the true gradient
and the MoE's own outputs at each top-k, and a global budget keeps the uniform one's FLOPs, in
memory and through the CLI, and loads back."""
import itertools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import budget
import convert
import dive
import model as modeling
import weaver
from checkpoint import save_checkpoint
from conftest import TOKENS, convert_main, converted, random_calibration, tiny_model
from export import export_problems


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 10_000),
       data=st.data())
def test_allocate_is_the_brute_force_optimum(sizes, seed, data):
    g = torch.Generator().manual_seed(seed)
    # decreasing curves as a layer's are, and unsorted ones: the search must not rely on convexity
    curves = [torch.rand(n + 1, generator=g, dtype=torch.float64) for n in sizes]
    curves = [c.sort(descending=True).values if i % 2 else c for i, c in enumerate(curves)]
    lowest = [data.draw(st.integers(0, min(1, n))) for n in sizes]
    total = data.draw(st.integers(sum(lowest), sum(sizes)))
    chosen = budget.allocate(curves, lowest, total)
    assert sum(chosen) == total and all(lo <= m <= n for m, lo, n in zip(chosen, lowest, sizes))
    best = min(sum(c[m].item() for c, m in zip(curves, ms))
               for ms in itertools.product(*(range(lo, n + 1) for lo, n in zip(lowest, sizes)))
               if sum(ms) == total)
    assert sum(c[m].item() for c, m in zip(curves, chosen)) == pytest.approx(best, abs=1e-12)


def test_allocate_refuses_a_total_out_of_reach():
    with pytest.raises(AssertionError, match="total 5 outside"):
        budget.allocate([torch.zeros(3), torch.zeros(2)], [1, 1], 5)


def moe_and_inputs(arch="llama"):
    model = converted(tiny_model(arch), n_experts=8, active=0.5, n_shared=1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, model.cfg.dim, generator=g)
    return model, model.layers[0].mlp, x, torch.randn(15, model.cfg.dim, generator=g)


def test_expert_terms_are_the_experts_outputs_against_the_gradient():
    _, moe, x, g = moe_and_inputs()
    budget.ELEMENTS, elements = 16, budget.ELEMENTS  # several batches
    try:
        a = budget.expert_terms(moe, x, g)
    finally:
        budget.ELEMENTS = elements
    with torch.no_grad():
        direct = torch.stack([(moe.experts.output(x, e) * g).sum(-1)
                              for e in range(moe.experts.down_proj.shape[0])], dim=1)
    torch.testing.assert_close(a, direct, rtol=1e-5, atol=1e-5)


def test_curve_terms_are_the_moe_at_each_top_k():
    _, moe, x, g = moe_and_inputs()
    first, second = budget.curve_terms(moe, x, g)
    k, E = moe.top_k, moe.experts.down_proj.shape[0]
    assert first.shape == second.shape == (E + 1,) and first[k] == second[k] == 0
    with torch.no_grad():
        base = moe(x)
        for m in range(1, E + 1):  # the MoE itself, routed to its top m
            moe.top_k = m
            change = ((moe(x) - base) * g).sum(-1).double()
            assert first[m].item() == pytest.approx(change.sum().item(), rel=1e-4, abs=1e-6)
            assert second[m].item() == pytest.approx(change.pow(2).sum().item(), rel=1e-4,
                                                     abs=1e-6)
        moe.top_k = k


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_loss_curves_use_the_loss_gradient_at_each_ffn_output(arch):
    model = converted(tiny_model(arch, n_layers=3), n_experts=8, active=0.5, n_shared=1)
    tokens = random_calibration(64).tokens
    model.layers[1].mlp.experts.down_proj.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    budget.LOGITS, logits = 64 * 16 * 2, budget.LOGITS  # two windows per batch
    try:
        curves = budget.loss_curves(model, tokens)
    finally:
        budget.LOGITS = logits
    assert sorted(curves) == [0, 1, 2]
    assert [p.requires_grad for p in model.parameters()] == flags  # left as they were
    assert all(p.grad is None for p in model.parameters())
    # the reference: a zero added to each FFN output, differentiated by autograd
    zeros, inputs = {}, {}

    def add_zero(i):
        def hook(module, args, out):
            inputs[i] = args[0].detach()
            zeros[i] = torch.zeros_like(out, requires_grad=True)
            return out + zeros[i]
        return hook
    handles = [b.mlp.register_forward_hook(add_zero(i)) for i, b in enumerate(model.layers)]
    with torch.enable_grad():
        logits = model(tokens)[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        grads = torch.autograd.grad(loss, [zeros[i] for i in range(3)])
    for h in handles:
        h.remove()
    n = tokens[:, 1:].numel()
    for i, g in enumerate(grads):
        moe = model.layers[i].mlp
        first, second = budget.curve_terms(moe, inputs[i].reshape(-1, model.cfg.dim),
                                           g.reshape(-1, model.cfg.dim))
        torch.testing.assert_close(curves[i], first + n / 2 * second, rtol=1e-4, atol=1e-7)


def test_a_global_budget_keeps_the_flops_and_loads_back(tmp_path):
    spec = dict(n_experts=16, active=0.5, n_shared=2)
    uniform = converted(tiny_model(n_layers=4, seed=1), **spec)
    model = tiny_model(n_layers=4, seed=1)  # a seed where moving an expert lowers the estimate
    report = convert.convert_model(model, random_calibration(64), weaver.ConvertSpec(
        **spec, budget="global"), log=lambda *_: None)
    layers, before = model.cfg.moe["layers"], uniform.cfg.moe["layers"]
    assert sum(a["top_k"] for a in layers) == sum(b["top_k"] for b in before)
    assert [a["top_k"] for a in layers] != [b["top_k"] for b in before], "nothing moved here"
    for a, b in zip(layers, before):  # same experts, top-k within the trust region
        assert (a["shared_neurons"], a["routed_experts"]) == \
            (b["shared_neurons"], b["routed_experts"])
        assert abs(a["top_k"] - b["top_k"]) <= max(1, round(budget.TRUST * b["top_k"]))
    assert [b.mlp.top_k for b in model.layers] == [a["top_k"] for a in layers]
    assert report["budget"]["top_k"] == [a["top_k"] for a in layers]
    assert report["budget"]["estimated_loss_change"] <= 0  # uniform is one of the candidates
    assert convert.active_fraction(model.cfg) == convert.active_fraction(uniform.cfg)
    hf_config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32,
                 "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "torch_dtype": "float32"}
    save_checkpoint(model, hf_config, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(modeling.load_model(str(tmp_path))(TOKENS), model(TOKENS))


def test_the_cli_writes_the_global_budget(tiny_checkpoint, tmp_path):
    spec = lambda b: weaver.ConvertSpec(n_experts=8, active=0.5, n_shared=1, budget=b)
    convert_main(tiny_checkpoint, str(tmp_path / "uniform"), spec("uniform"))
    report = convert_main(tiny_checkpoint, str(tmp_path / "global"), spec("global"))
    read = lambda d: json.load(open(os.path.join(tmp_path, d, "config.json")))["moe"]
    uniform, spread = read("uniform"), read("global")
    assert [layer["top_k"] for layer in spread["layers"]] == report["budget"]["top_k"]
    assert sum(layer["top_k"] for layer in spread["layers"]) == \
        sum(layer["top_k"] for layer in uniform["layers"])
    assert spread["budget"] == "global" and all(s is None for s in spread["topk_spread"])


@pytest.mark.parametrize("spec,match", [
    (dict(method="static"), "method static has none"),
    (dict(compensate=True), "compensation"),
    (dict(budget="layerwise"), "budget 'layerwise'"),
])
def test_global_budget_refuses_what_it_cannot_move(spec, match):
    with pytest.raises(ValueError, match=match):
        weaver.ConvertSpec(**{"budget": "global", **spec})


def test_global_budget_refuses_dive():
    with pytest.raises(ValueError, match="DIVE's pruned experts overlap"):
        dive.DiveSpec(budget="global")


def test_global_budget_is_not_exported():
    problems = export_problems(tiny_model().cfg, weaver.ConvertSpec(budget="global",
                                                                    router_bias=False))
    assert any("budget global" in p for p in problems)
