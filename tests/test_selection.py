"""--selection threshold: the threshold is the least one that keeps the calibration tokens' mean
number of experts within top-k (against trying every candidate); each token takes exactly its
experts above it, and at least min_k; a threshold below every score gives the dense FFN back; the
model loads back, runs the same through the kernels and trains; what cannot carry it refuses."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convert
import dive
import kernels
import model as modeling
import recursive
import train
import weaver
from checkpoint import save_checkpoint
from conftest import TOKENS, converted, hf_config_of, random_calibration, tiny_model
from export import export_problems

SPEC = dict(n_experts=8, active=0.75, n_shared=2, selection="threshold")


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), e=st.integers(1, 8), data=st.data(), ties=st.booleans(),
       seed=st.integers(0, 1000))
def test_fit_threshold_is_the_least_within_top_k(n, e, data, ties, seed):
    top_k = data.draw(st.integers(0, e))
    min_k = data.draw(st.integers(0, top_k))
    scores = torch.randn(n, e, generator=torch.Generator().manual_seed(seed))
    if ties:  # a few distinct values, many tokens level with the threshold
        scores = scores.round()
    threshold = weaver.fit_threshold(scores, top_k, min_k)
    assert threshold == weaver.fit_threshold_reference(scores, top_k, min_k)
    assert weaver.mean_selected(scores, threshold, min_k) <= top_k
    lower = scores[scores < threshold]
    if len(lower):  # the next candidate down would take more than top-k
        assert weaver.mean_selected(scores, lower.max().item(), min_k) > top_k


def test_each_token_takes_its_experts_above_the_threshold():
    layer = {"shared_neurons": 0, "routed_experts": 6, "top_k": 3, "threshold": 0.5, "min_k": 1}
    moe = modeling.MoEMLP(8, {"expert_dim": 2, "router": "lsq", "router_bias": False}, layer)
    scores = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    idx = moe.choose(scores)[0]
    for token, row in zip(scores, idx):
        above = (token > 0.5).nonzero().squeeze(1)
        want = token.topk(max(len(above), 1)).indices  # best first, at least min_k = 1
        assert torch.equal(row[: len(want)], want) and (row[len(want):] == -1).all()
    assert idx.shape[1] == int(((scores > 0.5).sum(1)).clamp(min=1).max())


def test_conversion_sets_thresholds_within_the_flops_and_loads_back(tmp_path):
    model = tiny_model("llama", 32, 48, 2, seed=3)
    calib = random_calibration(64)
    report = convert.convert_model(model, calib, weaver.ConvertSpec(**SPEC), log=lambda *_: None)
    for block, row, entry in zip(model.layers, report["layers"], model.cfg.moe["layers"]):
        assert entry["threshold"] == block.mlp.threshold and entry["min_k"] == block.mlp.min_k
        assert block.mlp.min_k == round(weaver.MIN_K_SHARE * block.mlp.top_k)
        assert row["mean_top_k"] <= block.mlp.top_k
        # the load is counted once, under the threshold: as many picks as the mean says
        assert sum(row["load"]) == pytest.approx(row["mean_top_k"] * calib.tokens.numel())
        assert f"experts above {entry['threshold']:.3g}" in convert.format_layer(row, 2)
    from experiments import SelectionCounter
    with SelectionCounter(model) as seen, torch.no_grad():  # in the converted model itself
        model(calib.tokens)
    for (chosen, tokens), row, block in zip(seen.counts.values(), report["layers"], model.layers):
        assert chosen / tokens == pytest.approx(row["mean_top_k"]) and \
            chosen / tokens <= block.mlp.top_k
    topk = converted(tiny_model("llama", 32, 48, 2, seed=3), **{**SPEC, "selection": "topk"})
    assert [b.mlp.top_k for b in model.layers] == [b.mlp.top_k for b in topk.layers]
    assert convert.active_fraction(model.cfg) == convert.active_fraction(topk.cfg)
    with torch.no_grad():
        assert not torch.equal(model(TOKENS), topk(TOKENS)), "the selection changed nothing"
    save_checkpoint(model, hf_config_of(model), str(tmp_path))
    loaded = modeling.load_model(str(tmp_path))
    with torch.no_grad():
        expected = model(TOKENS)
        assert torch.equal(loaded(TOKENS), expected)
        kernels.use_kernels(loaded, compile=False)
        torch.testing.assert_close(loaded(TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_a_threshold_below_every_score_is_the_dense_ffn():
    dense = tiny_model("llama", 32, 48, 2, seed=4)
    model = converted(tiny_model("llama", 32, 48, 2, seed=4), **SPEC)
    for block in model.layers:
        block.mlp.threshold = -float("inf")
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), dense(TOKENS), rtol=1e-5, atol=1e-5)


def test_a_threshold_model_trains_with_weighted_routing():
    model = converted(tiny_model("llama", 32, 48, 2, seed=5), **SPEC)
    train.set_routing(model, "softmax")
    train.install_recording(model)
    model.train()
    logits = model(TOKENS)
    logits.float().logsumexp(-1).mean().backward()
    for mlp in train.moe_layers(model):
        assert mlp.router.weight.grad is not None and mlp.router.weight.grad.abs().sum() > 0
        assert 0 < mlp.load.sum() <= TOKENS.numel() * mlp.experts.gate_up_proj.shape[0]


@pytest.mark.parametrize("spec,match", [
    (dict(method="static"), "method static has no router"),
    (dict(compensate=True), "compensation"),
    (dict(budget="global"), "budget global"),
    (dict(selection="topp"), "selection 'topp'"),
])
def test_threshold_refuses_what_it_cannot_go_with(spec, match):
    with pytest.raises(ValueError, match=match):
        weaver.ConvertSpec(**{"selection": "threshold", **spec})
    if spec == dict(method="static"):
        with pytest.raises(ValueError, match="DIVE"):
            dive.DiveSpec(selection="threshold")


def test_threshold_is_not_exported_nor_split(tmp_path):
    model = converted(tiny_model("llama", 32, 48, 2), **SPEC)
    assert any("selection threshold" in p for p in export_problems(model.cfg))
    assert any("selection threshold" in p for p in export_problems(
        tiny_model().cfg, weaver.ConvertSpec(**SPEC, router_bias=False)))
    with pytest.raises(ValueError, match="selects its experts by threshold"):
        recursive.check_spec(weaver.ConvertSpec(n_experts=2), model.cfg.moe, model.cfg)
    with pytest.raises(ValueError, match="one-level"):
        recursive.check_spec(weaver.ConvertSpec(n_experts=2, selection="threshold"),
                             model.cfg.moe, model.cfg)


def test_flops_are_counted_at_the_experts_each_token_took():
    from experiments import SelectionCounter, ffn_flops
    model = converted(tiny_model("llama", 32, 48, 2, seed=6), **SPEC)
    with SelectionCounter(model) as seen, torch.no_grad():
        model(TOKENS)
    for i, block in enumerate(model.layers):  # the reference: each token's count from its scores
        x = None
        def grab(_m, args):
            nonlocal x
            x = args[0].reshape(-1, args[0].shape[-1])
        hook = block.mlp.register_forward_pre_hook(grab)
        with torch.no_grad():
            model(TOKENS)
        hook.remove()
        scores = block.mlp.router(x, block.mlp.experts)
        taken = (scores > block.mlp.threshold).sum(1).clamp(min=block.mlp.min_k)
        assert seen.counts[i] == [int(taken.sum()), TOKENS.numel()]
    cfg = seen.top_k_seen(model.cfg)
    assert [layer["top_k"] for layer in cfg.moe["layers"]] == \
        [c[0] / c[1] for c in seen.counts.values()]
    D, d_e = model.cfg.dim, model.cfg.moe["expert_dim"]
    saved = sum(6 * D * d_e * (layer["top_k"] - seen_layer["top_k"])
                for layer, seen_layer in zip(model.cfg.moe["layers"], cfg.moe["layers"]))
    assert ffn_flops(model.cfg)["experts"] - ffn_flops(cfg)["experts"] == pytest.approx(saved)
    topk = converted(tiny_model("llama", 32, 48, 2, seed=6), **{**SPEC, "selection": "topk"})
    with SelectionCounter(topk) as none_seen:
        pass
    assert none_seen.top_k_seen(topk.cfg) == topk.cfg


@pytest.mark.parametrize("entry", [{"threshold": "high"}, {"threshold": 0.5, "min_k": 5},
                                   {"threshold": 0.5, "min_k": 1.5}, {"threshold": True},
                                   {"threshold": 0.5, "min_k": False}])
def test_a_bad_threshold_in_config_json_is_named(entry):
    layer = {"shared_neurons": 16, "routed_experts": 4, "top_k": 2, **entry}
    with pytest.raises(ValueError, match=r"moe.layers\[0\]: threshold"):
        modeling.check_moe_config({"router": "lsq", "expert_dim": 8, "layers": [layer]}, 48, 1)
