"""recursive.py: an MoE's experts converted in turn. With every sub-expert shared the two-level
MoE is the MoE it came from, bit for bit (every family, method and shape); the kernels' two-level
forward equals the reference loop; an expert sent too few calibration tokens is profiled on all of
them; the CLI writes a checkpoint that loads, and refuses what it cannot do in one line."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convert
import kernels
import model as modeling
import recursive
import weaver
from model import STOCK_MOE_TYPES
from conftest import TOKENS, random_calibration, stock_config, tiny_stock_moe

SIZES = dict(n_experts=4, expert_dim=16, top_k=2, shared=16)


def split(model, calib=None, **spec):
    calib = calib or random_calibration(samples=8, seqlen=64)
    report = convert.convert_model(model, calib, weaver.ConvertSpec(**spec), log=lambda *_: None)
    return model, report


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(STOCK_MOE_TYPES), method=st.sampled_from(weaver.METHODS),
       n_sub=st.sampled_from([1, 2, 4]), expert_dim=st.sampled_from([4, 8, 12]),
       top_k=st.integers(1, 3), seed=st.integers(0, 3))
def test_every_sub_expert_shared_is_the_moe_bit_for_bit(family, method, n_sub, expert_dim, top_k,
                                                         seed):
    model = tiny_stock_moe(family, seed, n_experts=4, expert_dim=expert_dim, top_k=top_k,
                           shared=8 if family == "qwen2_moe" else 0)
    expected = model(TOKENS)
    router = {"cmoe": "cmoe", "static": "none"}.get(method, "lsq")
    n_shared = n_sub if method != "static" else None
    split(model, random_calibration(samples=3, seqlen=16), method=method, n_experts=n_sub,
          active=1.0, n_shared=n_shared, router=router, allocation="uniform")
    assert all(isinstance(b.mlp.experts, modeling.SplitExperts) for b in model.layers)
    assert torch.equal(model(TOKENS), expected)


def test_a_conversion_of_ours_splits_too_and_stays_exact_when_all_is_shared():
    from conftest import converted, tiny_model
    model = converted(tiny_model(ffn_dim=96), n_experts=8, active=0.75)  # experts of 12 neurons
    expected = model(TOKENS)
    split(model, n_experts=3, active=1.0, n_shared=3)
    assert torch.equal(model(TOKENS), expected)
    model = converted(tiny_model(ffn_dim=96), n_experts=8, active=0.75)
    split(model, n_experts=3, active=0.67)  # k = 2 of 3: one shared, the top-1 of two routed
    assert model.cfg.moe["layers"][0]["split"]["top_k"] == 1


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_split_moe_runs_through_every_kernel_path_as_the_reference(family):
    model, _ = split(tiny_stock_moe(family, **SIZES), n_experts=4, active=0.5)
    mlp = model.layers[0].mlp
    assert mlp.experts.top_k == 1 and isinstance(mlp.shared, modeling.MoEMLP) == (
        family == "qwen2_moe")
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(0))
    expected = mlp(x)
    for path in ("reference", "select", "gather", "grouped"):
        torch.testing.assert_close(kernels.layer_forward(mlp, x, path), expected, rtol=1e-5,
                                   atol=1e-6)
    logits = model(TOKENS)
    kernels.use_kernels(model, compile=False)
    torch.testing.assert_close(model(TOKENS), logits, rtol=1e-5, atol=1e-5)


def test_the_two_level_layer_is_what_it_says():
    """A token computes each chosen expert's whole part and the inner top-k of its parts,
    weighted by the outer weight: written out token by token."""
    model, _ = split(tiny_stock_moe("olmoe", **SIZES), n_experts=4, active=0.5)
    mlp, x = model.layers[1].mlp, torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    idx, weights = mlp.route(x)
    s, act = mlp.experts, modeling.ACTIVATIONS[mlp.act]
    J = s.n_parts
    for n in range(len(x)):
        out = torch.zeros(32)
        for e, w in zip(idx[n].tolist(), weights[n]):
            scores = s.router(x[n: n + 1], s.parts)[0, e * J: (e + 1) * J]
            chosen = [e * J + j for j in scores.topk(s.top_k).indices.tolist()]
            for w13, w2 in [(s.whole.gate_up_proj[e], s.whole.down_proj[e])] + \
                    [(s.parts.gate_up_proj[p], s.parts.down_proj[p]) for p in chosen]:
                gate, up = (w13 @ x[n]).chunk(2)
                out += w * ((act(gate) * up) @ w2)
        torch.testing.assert_close(mlp.experts(x[n: n + 1], idx[n: n + 1], weights[n: n + 1])[0],
                                   out, rtol=1e-5, atol=1e-6)


def test_the_tokens_of_each_expert_are_cut_into_samples_per_task():
    flat = torch.arange(100.0)[:, None].expand(100, 3)
    task = torch.tensor([0] * 60 + [1] * 40)
    chosen = torch.arange(0, 100, 2)  # 30 tokens of task 0, 20 of task 1
    old = recursive.SAMPLE_TOKENS
    recursive.SAMPLE_TOKENS = 8
    try:
        x, tasks = recursive.samples_of(flat, task, chosen)
    finally:
        recursive.SAMPLE_TOKENS = old
    assert x.shape == (5, 8, 3) and tasks.tolist() == [0, 0, 0, 1, 1]  # 6 + 4 tokens dropped
    assert x[0, :, 0].tolist() == list(range(0, 16, 2)) and x[3, 0, 0] == 60


def test_an_expert_sent_too_few_tokens_is_topped_up_with_its_nearest_tokens(monkeypatch):
    calib = random_calibration(samples=8, seqlen=64)
    _, report = split(tiny_stock_moe("mixtral", **SIZES), calib, n_experts=4, active=0.5)
    rows = report["layers"]
    assert all(min(r["tokens_per_expert"]) >= recursive.MIN_TOKENS and r["topped_up"] == []
               for r in rows)
    # an expert none of whose tokens arrive, and, with a higher floor, every expert
    starved = tiny_stock_moe("mixtral", **SIZES)
    starved.layers[0].mlp.router.select_bias = torch.tensor([-1e9, 0.0, 0.0, 0.0])  # never 0
    monkeypatch.setattr(recursive, "MIN_TOKENS", 1)
    model, report = split(starved, calib, n_experts=4, active=0.5)
    assert report["layers"][0]["tokens_per_expert"][0] == 0
    assert report["layers"][0]["topped_up"] == [0]
    assert torch.isfinite(model(TOKENS)).all()
    monkeypatch.setattr(recursive, "MIN_TOKENS", 10**6)
    _, report = split(tiny_stock_moe("mixtral", **SIZES), calib, n_experts=4, active=0.5)
    assert all(r["topped_up"] == [0, 1, 2, 3] for r in report["layers"])


def test_the_nearest_tokens_are_those_whose_score_falls_least_short_of_their_choice():
    idx = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3]])  # (N, K): expert 0 gets tokens 0 and 3
    gap = torch.tensor([[0.0], [-0.5], [-0.1], [0.2]])  # expert 0's score less the k-th chosen
    routed = (idx == 0).any(dim=-1)
    assert recursive.nearest_tokens(routed, gap[:, 0], 0).tolist() == [0, 3]
    assert recursive.nearest_tokens(routed, gap[:, 0], 3).tolist() == [0, 2, 3]
    assert recursive.nearest_tokens(routed, gap[:, 0], 10).tolist() == [0, 1, 2, 3]
    # routed_to: the gaps are >= 0 exactly where the router chose, and a selection bias that keeps
    # an expert out leaves its gaps finite and in the order of its scores
    mlp = tiny_stock_moe("mixtral", **SIZES).layers[0].mlp
    flat = torch.randn(64, mlp.experts.gate_up_proj.shape[-1])
    ids, gaps = recursive.routed_to(mlp, flat)
    assert torch.equal(ids, mlp.route(flat)[0])
    chosen = torch.zeros_like(gaps, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(gaps >= 0, chosen)
    mlp.router.select_bias = torch.tensor([-1e9, 0.0, 0.0, 0.0])
    ids, starved = recursive.routed_to(mlp, flat)
    scores = mlp.router(flat, mlp.experts).float()
    kth = scores[:, 1:].topk(mlp.top_k, dim=-1).values[:, -1]  # among the other experts
    assert not (ids == 0).any()
    torch.testing.assert_close(starved[:, 0], scores[:, 0] - kth)


def stock_checkpoint(tmp_path, tiny_checkpoint, family="qwen2_moe") -> str:
    from checkpoint import save_safetensors
    model = tiny_stock_moe(family, **SIZES)
    path = tmp_path / family
    path.mkdir()
    state = modeling.stored_tensors(model)  # its own per-expert names
    ours = {modeling.hf_name(n): t for n, t in model.state_dict().items()}
    theirs = modeling.stock_sources(model.cfg, ours)
    for name, parts in theirs.items():
        tensor = ours[name]
        if name.endswith("gate_up_proj"):
            halves = list(tensor[:, : SIZES["expert_dim"]]) + list(tensor[:, SIZES["expert_dim"]:])
            state |= dict(zip(parts, halves))
        elif name.endswith("down_proj"):
            state |= dict(zip(parts, [t.T for t in tensor]))
        else:
            state[parts[0]] = tensor
    save_safetensors({n: t.contiguous() for n, t in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(stock_config(family, **SIZES)))
    for name in ("tokenizer.json", "prose.txt", "code.txt"):  # and convert_main's text
        shutil.copy(os.path.join(tiny_checkpoint, name), path)
    torch.testing.assert_close(modeling.load_model(str(path))(TOKENS), model(TOKENS), rtol=0,
                               atol=0)
    return str(path)


def test_the_cli_splits_a_stock_moe_and_refuses_what_it_cannot(tiny_checkpoint, tmp_path):
    from conftest import convert_main, tiny_data
    path = stock_checkpoint(tmp_path, tiny_checkpoint)
    text = tiny_data(path)
    out = str(tmp_path / "split")
    report = convert_main(path, out, weaver.ConvertSpec(n_experts=4, active=0.5))
    assert report["active_fraction"] == pytest.approx(0.5)
    moe = modeling.load_model(out)
    assert moe.cfg.model_type == "qwen2_moe" and moe.cfg.stock_moe is None
    assert all(layer["split"]["top_k"] == 1 and layer["shared_split"]["top_k"] == 1
               for layer in moe.cfg.moe["layers"])
    assert isinstance(moe.layers[0].mlp.experts, modeling.SplitExperts)
    # it heals like any MoE of ours: LoRA on every projection of both levels, and its router
    import train
    train.train(out, str(tmp_path / "healed"), train.TrainSpec(
        data=(os.path.join(path, "prose.txt"),), seqlen=16, batch=2, steps=1, warmup=0),
        train.RunSpec(val_seqlen=16, val_windows=1, device="cpu"), log=lambda *_: None)
    healed = modeling.load_model(str(tmp_path / "healed"))
    assert not torch.equal(healed.layers[0].mlp.experts.parts.down_proj,
                           moe.layers[0].mlp.experts.parts.down_proj)
    # a layer left as it is keeps its experts whole
    convert_main(path, str(tmp_path / "one"), weaver.ConvertSpec(n_experts=4, dense_layers=(1,)),
                 text)
    one = modeling.load_model(str(tmp_path / "one"))
    assert isinstance(one.layers[1].mlp.experts, modeling.Experts)
    assert isinstance(one.layers[0].mlp.experts, modeling.SplitExperts)
    for spec, pattern in [
        (weaver.ConvertSpec(n_experts=4, allocation="cv"), "splits every expert of a layer alike"),
        (weaver.ConvertSpec(n_experts=3), "--experts 3 does not divide the expert's 16 neurons"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            convert_main(path, str(tmp_path / "no"), spec, text)
    with pytest.raises(ValueError, match="already split"):
        convert_main(out, str(tmp_path / "no"), weaver.ConvertSpec(n_experts=4), text)
    with pytest.raises(ValueError, match="two levels of experts have no stock MoE format"):
        convert_main(out, str(tmp_path / "no"), data=text, format="qwen2_moe")
    assert not os.path.exists(tmp_path / "no")
