"""weaver.py and convert.py: partition invariants, exactness of the full-shared and all-experts MoE,
the checkpoint round trip, every method and router, and the errors on bad input."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import convert as C
import model as M
import weaver as W
from conftest import TOKENS, convert_main, converted, random_calibration, tiny_data, tiny_model

# ---- partitioning


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 9), capacity=st.integers(1, 7), levels=st.integers(2, 50),
       seed=st.integers(0, 10_000))
def test_balanced_assign_equals_the_greedy_reference(k, capacity, levels, seed):
    # few distinct cost levels => many ties, which both must break the same way
    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, levels, (k * capacity, k), generator=g).float()
    fast = W.balanced_assign(cost, capacity)
    assert torch.equal(fast, W.balanced_assign_reference(cost, capacity))
    assert torch.equal(torch.bincount(fast, minlength=k), torch.full((k,), capacity))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 10), capacity=st.integers(1, 8), dim=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_balanced_kmeans_partition_invariants(k, capacity, dim, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(k * capacity, dim, generator=g)
    neurons = torch.randperm(3 * k * capacity, generator=g)[: k * capacity]  # arbitrary neuron ids
    assign, iters = W.balanced_kmeans(features, k, seed, max_iter=20)
    groups = W.groups_of(neurons, assign, k)
    assert groups.shape == (k, capacity)
    # each neuron exactly once
    assert torch.equal(groups.flatten().sort().values, neurons.sort().values)
    # deterministic
    assert torch.equal(W.balanced_kmeans(features, k, seed, max_iter=20)[0], assign)
    assert 1 <= iters <= 20


def test_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 10
    features = centres.repeat_interleave(5, dim=0) + 0.01 * torch.randn(20, 8, generator=g)
    assign, _ = W.balanced_kmeans(features, 4, seed=1)
    assert all(len(set(assign[i * 5:(i + 1) * 5].tolist())) == 1 for i in range(4))


@pytest.mark.parametrize(
    "method,router",
    [
        ("expertweaver", None),
        ("random", None),
        ("cmoe", None),
        ("static", None),
        ("expertweaver", "oracle"),
        ("expertweaver", "cmoe"),
    ],
)
def test_every_method_regroups_the_dense_weights_exactly(method, router):
    model = tiny_model(ffn_dim=48, n_layers=2)
    dense = [(b.mlp.gate_proj.weight.clone(), b.mlp.up_proj.weight.clone(),
              b.mlp.down_proj.weight.clone()) for b in model.layers]
    converted(model, method=method, router=router, n_experts=8, active=0.5, k_act=4)
    for block, (gate, up, down) in zip(model.layers, dense):
        moe = block.mlp
        assert isinstance(moe, M.MoEMLP)
        idx = moe.neuron_index
        assert torch.equal(idx.sort().values, torch.arange(48))
        parts = (
            [(moe.shared.gate_proj.weight, moe.shared.up_proj.weight, moe.shared.down_proj.weight)]
            if moe.shared
            else []
        )
        E, F2, D = moe.experts.gate_up_proj.shape
        g_r, u_r = moe.experts.gate_up_proj.split(F2 // 2, dim=1)
        d_r = moe.experts.down_proj.permute(2, 0, 1).reshape(D, -1)
        parts.append((g_r.reshape(-1, D), u_r.reshape(-1, D), d_r))
        assert torch.equal(torch.cat([p[0] for p in parts]), gate[idx])
        assert torch.equal(torch.cat([p[1] for p in parts]), up[idx])
        assert torch.equal(torch.cat([p[2] for p in parts], dim=1), down[:, idx])
        # half of the neurons active
        assert len(moe.shared.gate_proj.weight) + moe.top_k * F2 // 2 == 24
        assert (moe.top_k == 0) == (method == "static")

# ---- allocation


def test_routing_stays_alive_at_every_budget():
    for n_experts in (8, 16, 64):
        for active in (0.1, 0.25, 0.5, 0.6, 0.7, 0.75, 0.9):
            k = round(active * n_experts)
            # alpha 0.2 .. 0.7
            sizes = [W.n_shared_experts(a / 20, n_experts, k, 0.7) for a in range(4, 15)]
            if k > 1:
                # at least one routed expert per token
                assert max(sizes) < k, (n_experts, active, sizes)
            assert sizes == sorted(sizes), "more specialised layers never get more shared experts"
    # the paper's rule where it leaves routing alive
    assert W.n_shared_experts(0.7, 64, 48, 0.7) == 45
    assert W.n_shared_experts(0.7, 64, 32, 0.7) == 22  # a fraction of k = 32 instead of 45 >= k
    model = converted(tiny_model(ffn_dim=64, n_layers=3), n_experts=16, active=0.5)
    assert all(b.mlp.top_k >= 1 for b in model.layers)


def test_shared_neurons_are_the_most_important_by_the_chosen_measure():
    mlp = tiny_model(ffn_dim=48, n_layers=1).layers[0].mlp
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1))
    # two batches: 2 samples, then 1
    stats = W.profile_layer(x, mlp, batch_tokens=16, contribution=True)
    gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)  # (3, 8, 48)
    importance = {"contribution": (gate * (x @ mlp.up_proj.weight.T)).abs().mean(dim=(0, 1)),
                  "activation": gate.abs().mean(dim=(0, 1))}
    assert torch.allclose(stats.contribution, importance["contribution"], rtol=1e-5, atol=1e-6)
    kept = {}
    for shared_by, score in importance.items():
        spec = W.ConvertSpec(method="static", n_experts=8, active=0.5, shared_by=shared_by)
        kept[shared_by] = W.plan_static(stats, torch.tensor([0, 0, 1]), spec, 0).shared
        assert torch.equal(kept[shared_by], score.topk(24).indices.sort().values)
    # the two measures disagree here
    assert not torch.equal(kept["contribution"], kept["activation"])
    with pytest.raises(ValueError, match="shared_by 'rate' is not one of"):
        W.ConvertSpec(shared_by="rate")


def test_specialisation_ratio():
    # neuron 1: task means 1 and 3
    profile = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]])
    cv, r = W.specialization(profile, torch.tensor([0, 0, 1, 1]), tau=0.3)
    assert cv[0] == 0 and cv[1] == pytest.approx(0.5, rel=1e-5) and r == 0.5

# ---- exactness


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3"]), dim=st.sampled_from([16, 32]),
       n_experts=st.sampled_from([2, 4, 8]), expert_dim=st.integers(1, 6),
       n_layers=st.integers(1, 3),
       method=st.sampled_from(["expertweaver", "random", "cmoe", "static"]),
       seed=st.integers(0, 1000))
def test_full_shared_reproduces_dense_bit_for_bit(arch, dim, n_experts, expert_dim, n_layers,
                                                  method, seed):
    model = tiny_model(arch, dim, n_experts * expert_dim, n_layers, seed)
    dense = model(TOKENS)
    converted(model, method=method, n_experts=n_experts, active=1.0, n_shared=n_experts, seed=seed,
              k_act=1)
    assert all(
        b.mlp.experts is None and len(b.mlp.shared.gate_proj.weight) == model.cfg.ffn_dim
        for b in model.layers
    )
    assert torch.equal(model(TOKENS), dense)


@settings(max_examples=16, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3"]), n_experts=st.sampled_from([4, 8]),
       method=st.sampled_from(["expertweaver", "random", "cmoe"]),
       router=st.sampled_from([None, "centroid", "lsq", "gate", "oracle"]),
       seed=st.integers(0, 1000))
def test_all_experts_active_matches_dense(arch, n_experts, method, router, seed):
    model = tiny_model(arch, 32, n_experts * 6, 2, seed)
    dense = model(TOKENS)
    converted(model, method=method, router=router, n_experts=n_experts, active=1.0, seed=seed,
              k_act=3)
    assert all(b.mlp.top_k == b.mlp.experts.gate_up_proj.shape[0] for b in model.layers)
    torch.testing.assert_close(model(TOKENS), dense, rtol=1e-5, atol=1e-5)


def test_demo_full_shared_is_exact(demo_path):
    model = M.load_model(demo_path)
    tokens = torch.tensor([M.load_tokenizer(demo_path).encode("The capital of France is").ids])
    dense = model(tokens)
    calib = random_calibration(vocab=model.cfg.vocab_size, samples=1, seqlen=8)
    C.convert(model, calib, W.ConvertSpec(active=1.0, alpha_min=1.0, alpha_max=1.0),
              log=lambda *_: None)
    assert torch.equal(model(tokens), dense)


def test_sequential_and_dense_layers():
    a = converted(tiny_model(n_layers=3), n_experts=8, active=0.5, dense_layers=(1,))
    assert isinstance(a.layers[1].mlp, M.MLP) and a.cfg.moe["layers"][1] is None
    b = converted(tiny_model(n_layers=3), n_experts=8, active=0.5, dense_layers=(1,),
                  sequential=True)
    # layer 0 sees the same inputs either way; layer 2 sees the outputs of an MoE layer 0 when
    # sequential, so its profile, partition and router differ
    first, second = a.layers[0].mlp.state_dict(), b.layers[0].mlp.state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(a.layers[2].mlp.router.weight, b.layers[2].mlp.router.weight)
    # and what layer 2 of the sequential conversion was fitted on is what the converted model feeds
    # it
    calib = random_calibration(64)
    inputs = []
    hook = b.layers[2].mlp.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    b(calib.tokens)
    hook.remove()
    refit, _ = W.lsq_router(inputs[0], calib.task, b.layers[2].mlp.experts.contributions,
                            b.layers[2].mlp.experts.gate_up_proj.shape[0], b.layers[2].mlp.top_k)
    torch.testing.assert_close(refit["weight"], b.layers[2].mlp.router.weight, rtol=1e-4, atol=1e-5)


def test_lsq_recovers_a_planted_linear_router():
    # contributions that are exactly linear in x: y = x A + b per expert
    g = torch.Generator().manual_seed(0)
    D, E, S, T = 12, 4, 8, 50
    A, b = torch.randn(D, E, generator=g), torch.randn(E, generator=g)
    x = torch.randn(S, T, D, generator=g)
    task = torch.arange(2).repeat_interleave(S // 2)
    router, info = W.lsq_router(x, task, lambda xb: xb.float() @ A + b, n_experts=E, top_k=2)
    torch.testing.assert_close(router["weight"], A.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(router["bias"], b, rtol=1e-4, atol=1e-4)
    assert info["lsq_target"] == "linear" and info["lsq_val_captured"] == pytest.approx(1.0)


def test_lsq_final_fit_uses_every_token_with_a_bounded_validation_sample(monkeypatch):
    # noisy contributions, several batches, and fewer validation tokens kept than held out: the
    # scoring sample is bounded, but the final ridge solution is the one over all the tokens,
    # held-out ones included
    g = torch.Generator().manual_seed(1)
    D, E, S, T, lam = 6, 3, 16, 10, 1e-2
    A = torch.randn(D, E, generator=g)
    x = torch.randn(S, T, D, generator=g)
    noise = torch.randn(S * T, E, generator=g)
    rows = x.reshape(-1, D)
    contributions = dict(zip([r.tobytes() for r in rows.numpy()], rows @ A + noise))
    lookup = lambda xb: torch.stack([contributions[r.tobytes()] for r in xb.numpy()])
    monkeypatch.setattr(W, "TARGETS", {"linear": lambda y, s: y})
    monkeypatch.setattr(W, "RIDGE", (lam,))
    task = torch.arange(2).repeat_interleave(S // 2)
    router, info = W.lsq_router(x, task, lookup, n_experts=E, top_k=1, batch_tokens=3 * T,
                                max_val_tokens=7)
    x1 = torch.cat([x.reshape(-1, D), torch.ones(S * T, 1)], dim=1).double()
    y = (x.reshape(-1, D) @ A + noise).double()
    fit_rows = (~W.validation_samples(task)).repeat_interleave(T)
    penalty = torch.diag(torch.tensor([1.0] * D + [0.0], dtype=torch.float64))
    ridge = (x1[fit_rows].T @ x1[fit_rows]).diagonal()[:D].mean()
    w = torch.linalg.solve(x1.T @ x1 + lam * ridge * penalty, x1.T @ y)
    torch.testing.assert_close(router["weight"], w[:D].T.float())
    torch.testing.assert_close(router["bias"], w[D].float())
    # a validation sample existed, bounded to 7 of the 40 held-out tokens
    assert "lsq_val_captured" in info


def test_captured_is_one_for_the_oracle_and_less_otherwise():
    truth = torch.tensor([[3.0, 2.0, 1.0], [1.0, 5.0, 0.0]])
    assert W.captured(truth, truth, 1) == 1.0
    assert W.captured(-truth, truth, 1) == pytest.approx((1.0 + 0.0) / (3.0 + 5.0))


@pytest.mark.parametrize("router", ["centroid", "lsq", "cmoe", "gate"])
def test_conversion_is_deterministic_for_a_seed(router):
    a = converted(tiny_model(n_layers=2), n_experts=8, active=0.5, router=router, seed=3)
    b = converted(tiny_model(n_layers=2), n_experts=8, active=0.5, router=router, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_oracle_router_picks_the_largest_contributions():
    model = converted(tiny_model(ffn_dim=48, n_layers=1), n_experts=8, active=0.5, router="oracle")
    moe = model.layers[0].mlp
    x = torch.randn(5, 32)
    gate, up = torch.einsum("nd,efd->nef", x, moe.experts.gate_up_proj).chunk(2, dim=-1)
    # (5, E, D)
    out = torch.einsum("nef,efd->ned", torch.nn.functional.silu(gate) * up, moe.experts.down_proj)
    truth = out.norm(dim=-1)  # (5, E)
    picked = moe.route(x)[0].sort(dim=1).values
    # the router sums in another order: rows whose k-th and (k+1)-th experts nearly tie may differ
    top = truth.topk(moe.top_k + 1).values
    clear = top[:, -2] - top[:, -1] > 1e-5 * top[:, 0]
    assert clear.sum() >= 4
    expected = truth.topk(moe.top_k).indices.sort(dim=1).values
    assert torch.equal(picked[clear], expected[clear])


def test_cmoe_markers_mark_k_act_neurons_per_token():
    model = tiny_model(ffn_dim=48, n_layers=1)
    x = torch.randn(3, 8, 32)
    stats = W.profile_layer(x, model.layers[0].mlp, k_act=5,
                            marker_tokens=torch.tensor([0, 3, 9, 23]))
    assert stats.markers.shape == (4, 48) and (stats.markers.sum(1) == 5).all()
    # token 9 is token 1 of sample 1: its markers are the top 5 of CMoE's unit-norm score
    xn = torch.nn.functional.normalize(x[1, 1], dim=0)
    gate = torch.nn.functional.normalize(model.layers[0].mlp.gate_proj.weight, dim=1)
    up = torch.nn.functional.normalize(model.layers[0].mlp.up_proj.weight, dim=1)
    score = (torch.nn.functional.silu(gate @ xn) * (up @ xn)).abs()
    assert torch.equal(stats.markers[2].nonzero().squeeze(1), score.topk(5).indices.sort().values)

# ---- the checkpoint


def test_moe_checkpoint_round_trip_and_corruption(tmp_path):
    model = converted(tiny_model("qwen2", n_layers=2), n_experts=8, active=0.75, dense_layers=(0,))
    expected = model(TOKENS)
    hf_config = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32,
                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "tie_word_embeddings": True}
    good = tmp_path / "moe"
    M.save_checkpoint(model, hf_config, str(good))
    loaded = M.load_model(str(good))
    assert isinstance(loaded.layers[0].mlp, M.MLP) and isinstance(loaded.layers[1].mlp, M.MoEMLP)
    assert torch.equal(loaded(TOKENS), expected)

    def variant(name, config_change=None, tensor_change=None):
        from safetensors.torch import load_file, save_file
        path = tmp_path / name
        shutil.copytree(good, path)
        cfg = json.loads((path / "config.json").read_text())
        if config_change:
            config_change(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
        if tensor_change:
            tensors = load_file(path / "model.safetensors")
            tensor_change(tensors)
            save_file(tensors, path / "model.safetensors")
        return str(path)

    def more_experts(cfg):
        cfg["moe"]["layers"][1]["routed_experts"] += 1
        cfg["moe"]["layers"][1]["shared_neurons"] -= cfg["moe"]["expert_dim"]
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.(shared|experts)\.\S+' has shape "
                                         r".*, config.json implies"):
        M.load_model(variant("count", more_experts))
    with pytest.raises(ValueError, match=r"moe.layers\[1\]: .* != intermediate_size 48"):
        M.load_model(variant("sizes", lambda c: c["moe"]["layers"][1].update(shared_neurons=6)))
    with pytest.raises(ValueError, match=r"moe.layers\[1\]: top_k 99"):
        M.load_model(variant("topk", lambda c: c["moe"]["layers"][1].update(top_k=99)))

    def duplicate(tensors):
        index = tensors["model.layers.1.mlp.neuron_index"]
        index[0] = index[1]
    with pytest.raises(ValueError,
                       match="model.layers.1.mlp.neuron_index' is not a permutation of the 48"):
        M.load_model(variant("index", tensor_change=duplicate))
    with pytest.raises(ValueError, match="lacks 1 tensor.*model.layers.1.mlp.router.weight"):
        drop_router = lambda t: t.pop("model.layers.1.mlp.router.weight")
        M.load_model(variant("router", tensor_change=drop_router))

# ---- calibration and the CLI


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
    specs = [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl") + ":qa"]
    calib = C.calibration_from_files(tokenizer, specs, samples=3, seqlen=10, seed=0)
    assert (
        calib.tokens.shape == (6, 10)
        and calib.names == ["a", "qa"]
        and calib.task.tolist() == [0] * 3 + [1] * 3
    )
    assert torch.equal(C.calibration_from_files(tokenizer, specs, 3, 10, 0).tokens, calib.tokens)
    # never from the held-out last 10% of a.txt (tokens 900..999)
    assert calib.tokens[:3].max() < 900 - 1
    with pytest.raises(
        ValueError, match=r"task 'qa' has 16 windows of 10 tokens, fewer than --calib-samples 20"
    ):
        C.calibration_from_files(tokenizer, specs, samples=20, seqlen=10, seed=0)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="calibration file .*empty.txt is empty"):
        C.calibration_from_files(tokenizer, [str(tmp_path / "empty.txt")], 1, 10, 0)
    with pytest.raises(FileNotFoundError, match="nope.txt not found"):
        C.calibration_from_files(tokenizer, [str(tmp_path / "nope.txt")], 1, 10, 0)


def test_spec_and_input_errors():
    with pytest.raises(ValueError, match=r"active 1.5 must be in \(0, 1\]"):
        W.ConvertSpec(active=1.5)
    with pytest.raises(ValueError, match=r"active 0 must be in \(0, 1\]"):
        W.ConvertSpec(active=0)
    with pytest.raises(ValueError, match="does not go with method 'static'"):
        W.ConvertSpec(method="static", router="centroid")
    with pytest.raises(ValueError, match="intermediate_size 48 is not divisible by --experts 5: "
                                         ".*valid counts near it: 3, 4, 6, 8"):
        converted(tiny_model(ffn_dim=48), n_experts=5)
    one_task = C.Calibration(
        torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), ["only"]
    )
    with pytest.raises(ValueError, match="at least 2 tasks; got 1"):
        C.convert(tiny_model(), one_task, W.ConvertSpec(n_experts=8))


def test_convert_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "moe")
    prose = os.path.join(tiny_checkpoint, "prose.txt")
    report = convert_main(tiny_checkpoint, out, data=tiny_data(tiny_checkpoint, evals=(prose,)),
                          save_dtype="bfloat16", prompt="w1 w2")
    printed = capsys.readouterr().out
    # dense was loaded for --eval
    assert "dense greedy: 'w1 w2 " in printed and "moe greedy:   'w1 w2 " in printed
    assert sorted(os.listdir(out)) == [".expertweaver", "config.json", "model.safetensors",
                                       "report.json", "tokenizer.json"]
    moe = M.load_model(out)
    assert next(moe.parameters()).dtype == torch.float32  # bf16 on disk, loaded as asked
    assert report["active_fraction"] == pytest.approx(0.75)
    result = report["eval"][prose]
    assert result["ratio"] == pytest.approx(result["moe_ppl"] / result["dense_ppl"])
    assert json.load(open(os.path.join(out, "report.json")))["layers"][0]["routed_experts"] > 0
    assert moe.generate(torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)
    with pytest.raises(ValueError, match="already an MoE checkpoint"):
        convert_main(out, str(tmp_path / "again"), data=tiny_data(tiny_checkpoint))


@pytest.mark.parametrize("where", ["writing a shard", "converting layer 1"])
def test_convert_failure_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, where):
    import safetensors.torch
    if where == "writing a shard":
        def broken(*args, **kwargs):
            raise RuntimeError("disk full")
        monkeypatch.setattr(safetensors.torch, "save_file", broken)
    else:
        build, calls = W.build_moe, []

        def broken(*args):  # converts layer 0, fails on layer 1
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("interrupted")
            return build(*args)
        monkeypatch.setattr(W, "build_moe", broken)
    # a failed write names the file and says what became of --out
    error = (OSError, "shard-0.tmp: disk full; nothing was written to .*moe$") \
        if where == "writing a shard" else (RuntimeError, "interrupted")
    with pytest.raises(error[0], match=error[1]):
        convert_main(tiny_checkpoint, str(tmp_path / "moe"))
    assert os.listdir(tmp_path) == []


def test_convert_refuses_a_foreign_out_dir(tiny_checkpoint, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and was not written by expertweaver"):
        convert_main(tiny_checkpoint, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_generated_calibration_is_seeded():
    model = tiny_model()

    class Tok:  # prompts of different lengths, so the batch needs padding
        def encode(self, text):
            return type("E", (), {"ids": [ord(c) % 60 + 4 for c in text[: len(text) % 5 + 2]]})()
    a = C.calibration_from_model(model, Tok(), samples=2, seqlen=12, seed=3, log=lambda *_: None)
    b = C.calibration_from_model(model, Tok(), samples=2, seqlen=12, seed=3, log=lambda *_: None)
    assert a.tokens.shape == (2 * len(C.TASK_PROMPTS), 12) and torch.equal(a.tokens, b.tokens)
    assert a.names == list(C.TASK_PROMPTS)
    prompts = [Tok().encode(p).ids for p in C.TASK_PROMPTS.values()]
    assert len(set(map(len, prompts))) > 1
    # every window starts with its prompt, never with padding
    for row, task in zip(a.tokens, a.task):
        assert row[: len(prompts[task])].tolist() == prompts[task]
