"""weaver.py: partition invariants, planted structure recovered, exactness of the full-shared and
all-experts MoE, every method and router, the lsq fit."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import model as modeling
import weaver
from conftest import TOKENS, converted, tiny_model

# ---- partitioning


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 9), capacity=st.integers(1, 7), levels=st.integers(2, 50),
       seed=st.integers(0, 10_000))
def test_balanced_assign_equals_the_greedy_reference(k, capacity, levels, seed):
    # few distinct cost levels => many ties, which both must break the same way
    g = torch.Generator().manual_seed(seed)
    cost = torch.randint(0, levels, (k * capacity, k), generator=g).float()
    fast = weaver.balanced_assign(cost, capacity)
    assert torch.equal(fast, weaver.balanced_assign_reference(cost, capacity))
    assert torch.equal(torch.bincount(fast, minlength=k), torch.full((k,), capacity))


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 10), capacity=st.integers(1, 8), dim=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_balanced_kmeans_partition_invariants(k, capacity, dim, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.rand(k * capacity, dim, generator=g)
    neurons = torch.randperm(3 * k * capacity, generator=g)[: k * capacity]  # arbitrary neuron ids
    assign, iters = weaver.balanced_kmeans(features, k, seed, max_iter=20)
    groups = weaver.groups_of(neurons, assign, k)
    assert groups.shape == (k, capacity)
    # each neuron exactly once
    assert torch.equal(groups.flatten().sort().values, neurons.sort().values)
    # deterministic
    assert torch.equal(weaver.balanced_kmeans(features, k, seed, max_iter=20)[0], assign)
    assert 1 <= iters <= 20


def test_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 8, generator=g) * 10
    features = centres.repeat_interleave(5, dim=0) + 0.01 * torch.randn(20, 8, generator=g)
    assign, _ = weaver.balanced_kmeans(features, 4, seed=1)
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
        assert isinstance(moe, modeling.MoEMLP)
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
            sizes = [weaver.n_shared_experts(a / 20, n_experts, k, 0.7) for a in range(4, 15)]
            if k > 1:
                # at least one routed expert per token
                assert max(sizes) < k, (n_experts, active, sizes)
            assert sizes == sorted(sizes), "more specialised layers never get more shared experts"
    # the paper's rule where it leaves routing alive
    assert weaver.n_shared_experts(0.7, 64, 48, 0.7) == 45
    assert (
        weaver.n_shared_experts(0.7, 64, 32, 0.7) == 22
    )  # a fraction of k = 32 instead of 45 >= k
    model = converted(tiny_model(ffn_dim=64, n_layers=3), n_experts=16, active=0.5)
    assert all(b.mlp.top_k >= 1 for b in model.layers)


def test_shared_neurons_are_the_most_important_by_the_chosen_measure():
    mlp = tiny_model(ffn_dim=48, n_layers=1).layers[0].mlp
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1))
    # two batches: 2 samples, then 1
    stats = weaver.profile_layer(x, mlp, batch_tokens=16, contribution=True)
    gate = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T)  # (3, 8, 48)
    importance = {"contribution": (gate * (x @ mlp.up_proj.weight.T)).abs().mean(dim=(0, 1)),
                  "activation": gate.abs().mean(dim=(0, 1))}
    assert torch.allclose(stats.contribution, importance["contribution"], rtol=1e-5, atol=1e-6)
    kept = {}
    for shared_by, score in importance.items():
        spec = weaver.ConvertSpec(method="static", n_experts=8, active=0.5, shared_by=shared_by)
        kept[shared_by] = weaver.plan_static(stats, torch.tensor([0, 0, 1]), spec, 0).shared
        assert torch.equal(kept[shared_by], score.topk(24).indices.sort().values)
    # the two measures disagree here
    assert not torch.equal(kept["contribution"], kept["activation"])
    with pytest.raises(ValueError, match="shared_by 'rate' is not one of"):
        weaver.ConvertSpec(shared_by="rate")


def test_specialisation_ratio():
    # neuron 1: task means 1 and 3
    profile = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]])
    cv, r = weaver.specialization(profile, torch.tensor([0, 0, 1, 1]), tau=0.3)
    assert cv[0] == 0 and cv[1] == pytest.approx(0.5, rel=1e-5) and r == 0.5

# ---- exactness


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "gemma3_text"]),
       dim=st.sampled_from([16, 32]),
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
@given(arch=st.sampled_from(["llama", "qwen2", "qwen3", "gemma3_text"]),
       n_experts=st.sampled_from([4, 8]),
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


def test_gemma_conversion_keeps_its_geglu_everywhere():
    # the profile, CMoE's router and every FFN piece of the MoE use the model's tanh-GELU gate
    model = converted(tiny_model("gemma3_text", 32, 48, 2), method="cmoe", n_experts=8,
                      active=0.5, k_act=3)
    moe = model.layers[0].mlp
    assert {moe.act, moe.shared.act, moe.experts.act, moe.router.act} == {"gelu_pytorch_tanh"}
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    gate = moe.router.weight.float() @ x.T  # (E, N)
    expected = ((moe.router.up.float() @ x.T) * F.gelu(gate, approximate="tanh")).abs().T
    torch.testing.assert_close(moe.router(x, moe.experts), expected)


def test_lsq_recovers_a_planted_linear_router():
    # contributions that are exactly linear in x: y = x A + b per expert
    g = torch.Generator().manual_seed(0)
    D, E, S, T = 12, 4, 8, 50
    A, b = torch.randn(D, E, generator=g), torch.randn(E, generator=g)
    x = torch.randn(S, T, D, generator=g)
    task = torch.arange(2).repeat_interleave(S // 2)
    router, info = weaver.lsq_router(x, task, lambda xb: xb.float() @ A + b, n_experts=E, top_k=2)
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
    monkeypatch.setattr(weaver, "TARGETS", {"linear": lambda y, s: y})
    monkeypatch.setattr(weaver, "RIDGE", (lam,))
    task = torch.arange(2).repeat_interleave(S // 2)
    router, info = weaver.lsq_router(x, task, lookup, n_experts=E, top_k=1, batch_tokens=3 * T,
                                max_val_tokens=7)
    x1 = torch.cat([x.reshape(-1, D), torch.ones(S * T, 1)], dim=1).double()
    y = (x.reshape(-1, D) @ A + noise).double()
    fit_rows = (~weaver.validation_samples(task)).repeat_interleave(T)
    penalty = torch.diag(torch.tensor([1.0] * D + [0.0], dtype=torch.float64))
    ridge = (x1[fit_rows].T @ x1[fit_rows]).diagonal()[:D].mean()
    w = torch.linalg.solve(x1.T @ x1 + lam * ridge * penalty, x1.T @ y)
    torch.testing.assert_close(router["weight"], w[:D].T.float())
    torch.testing.assert_close(router["bias"], w[D].float())
    # a validation sample existed, bounded to 7 of the 40 held-out tokens
    assert "lsq_val_captured" in info


@pytest.mark.parametrize("winner", sorted(weaver.TARGETS))
def test_choose_fit_can_pick_each_target(winner):
    # normal equations whose exact solution, for the `winner` target alone, orders every held-out
    # token's experts as the truth does; the other targets' solutions are random
    g = torch.Generator().manual_seed(0)
    D, E, n = 5, 6, 200
    val_x = torch.cat([torch.randn(n, D, generator=g), torch.ones(n, 1)], dim=1).double()
    truth_w = torch.randn(D + 1, E, generator=g).double()
    gram = val_x.T @ val_x
    cross = {name: gram @ (truth_w if name == winner else torch.randn(D + 1, E, generator=g))
             .double() for name in weaver.TARGETS}
    eq = weaver.NormalEquations({"fit": gram, "val": gram}, {"fit": cross, "val": cross}, val_x,
                           (val_x @ truth_w).float())
    (target, lam), info = weaver.choose_fit(eq, top_k=2, unit=gram.diagonal()[:D].mean(), bias=True)
    assert target == winner and info["lsq_val_captured"] == pytest.approx(1.0, abs=1e-6)


def planted_layer(groups: int = 8, size: int = 4, D: int = 16, S: int = 32, T: int = 8):
    """An FFN whose neurons fire in planted groups: every token of a sample lies near one of
    `groups` orthonormal prototypes, and the gate rows of a group's neurons point at its
    prototype. The groups are interleaved in neuron order (group of neuron i = a fixed shuffle), so
    that leaving the neurons in order does not find them. -> (mlp, x (S, T, D), task (S,), group
    of each neuron)."""
    g = torch.Generator().manual_seed(0)
    prototypes = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:groups]  # (G, D)
    group_of = torch.arange(groups).repeat_interleave(size)[torch.randperm(groups * size,
                                                                           generator=g)]
    mlp = modeling.MLP(D, groups * size)
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(4 * prototypes[group_of])
        mlp.up_proj.weight.copy_(torch.randn(groups * size, D, generator=g))
        mlp.down_proj.weight.copy_(torch.randn(D, groups * size, generator=g))
    task = torch.arange(S) % groups
    x = prototypes[task][:, None, :] + 0.05 * torch.randn(S, T, D, generator=g)
    return mlp, x, task, group_of


def routed_error(mlp, x, plan) -> float:
    """Relative error of the MoE of `plan`, each token using its best expert (oracle router)."""
    moe = weaver.build_moe(mlp, plan, "oracle")
    flat = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        return ((moe(flat) - mlp(flat)).norm() / mlp(flat).norm()).item()


def test_the_partition_recovers_planted_groups_and_beats_a_random_one():
    mlp, x, task, group_of = planted_layer()
    spec = weaver.ConvertSpec(n_experts=8, active=1 / 8, n_shared=0, router="oracle")
    stats = weaver.profile_layer(x, mlp, contribution=True)
    recovered = lambda plan: sorted(map(sorted, group_of[plan.groups].tolist())) == \
        [[g] * 4 for g in range(8)]
    woven = weaver.plan_expertweaver(stats, task, spec, seed=0)
    random = weaver.plan_random(stats, task, spec, seed=0)
    assert recovered(woven) and not recovered(random)
    assert routed_error(mlp, x, woven) < 0.15 < 0.4 < routed_error(mlp, x, random)
    # the test can fail: experts made of the neurons in id order (no partition at all) miss the
    # planted groups and route badly
    in_order = weaver.LayerPlan(woven.shared, torch.arange(32).view(8, 4), woven.top_k, {})
    assert not recovered(in_order) and routed_error(mlp, x, in_order) > 0.4


def test_captured_is_one_for_the_oracle_and_less_otherwise():
    truth = torch.tensor([[3.0, 2.0, 1.0], [1.0, 5.0, 0.0]])
    assert weaver.captured(truth, truth, 1) == 1.0
    assert weaver.captured(-truth, truth, 1) == pytest.approx((1.0 + 0.0) / (3.0 + 5.0))


@pytest.mark.parametrize("router", ["centroid", "lsq", "cmoe", "gate"])
def test_conversion_is_deterministic_for_a_seed(router):
    a = converted(tiny_model(n_layers=2), n_experts=8, active=0.5, router=router, seed=3)
    b = converted(tiny_model(n_layers=2), n_experts=8, active=0.5, router=router, seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@settings(max_examples=30, deadline=None)
@given(n_experts=st.integers(1, 6), expert_dim=st.integers(1, 9), n=st.integers(1, 40),
       bias=st.booleans(), act=st.sampled_from(sorted(modeling.ACTIVATIONS)),
       chunk=st.integers(1, 16), seed=st.integers(0, 10_000))
def test_contributions_equal_the_outputs_norms(n_experts, expert_dim, n, bias, act, chunk, seed):
    # the quadratic form per expert against the norm of each expert's output, computed
    g = torch.Generator().manual_seed(seed)
    experts = modeling.Experts(n_experts, 24, expert_dim, bias=bias, act=act)
    for p in experts.parameters():
        p.data = torch.randn(p.shape, generator=g)
    x = torch.randn(n, 24, generator=g)
    fast, slow = experts.contributions(x, chunk=chunk), experts.contributions_reference(x)
    assert fast.shape == slow.shape == (n, n_experts) and fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4 * slow.max().item())


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
    stats = weaver.profile_layer(x, model.layers[0].mlp, k_act=5,
                            marker_tokens=torch.tensor([0, 3, 9, 23]))
    assert stats.markers.shape == (4, 48) and (stats.markers.sum(1) == 5).all()
    # token 9 is token 1 of sample 1: its markers are the top 5 of CMoE's unit-norm score
    xn = torch.nn.functional.normalize(x[1, 1], dim=0)
    gate = torch.nn.functional.normalize(model.layers[0].mlp.gate_proj.weight, dim=1)
    up = torch.nn.functional.normalize(model.layers[0].mlp.up_proj.weight, dim=1)
    score = (torch.nn.functional.silu(gate @ xn) * (up @ xn)).abs()
    assert torch.equal(stats.markers[2].nonzero().squeeze(1), score.topk(5).indices.sort().values)

# ---- the checkpoint


# ---- calibration and the CLI


# ---- compensation


def test_compensation_leaves_no_mean_error_on_the_calibration_tokens():
    # each expert's stand-in is its mean output over the calibration tokens that skip it, so over
    # them the compensated layer's error against the dense FFN averages to zero; the same experts
    # are chosen as without it
    dense = tiny_model("llama", 32, 48, 1).layers[0].mlp
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))  # (S, T, D)
    task = torch.tensor([0, 0, 1, 1])
    spec = weaver.ConvertSpec(n_experts=8, active=0.5, compensate=True)
    moe, row = weaver.convert_ffn(copy.deepcopy(dense), x, task, spec, seed=0)
    plain, _ = weaver.convert_ffn(copy.deepcopy(dense), x, task, replace(spec, compensate=False),
                                  seed=0)
    flat = x.reshape(-1, 32)
    assert torch.equal(moe.route(flat)[0], plain.route(flat)[0])
    error, plain_error = (dense(flat) - moe(flat)).mean(0), (dense(flat) - plain(flat)).mean(0)
    assert error.abs().max() < 1e-6 < 1e-3 < plain_error.abs().max()
    assert row["compensation_norm_over_output"] > 0
    # the layer adds the stand-ins of exactly the experts a token skips
    idx = moe.route(flat)[0]
    skipped = torch.ones(len(flat), 6).scatter_(1, idx, 0.0)
    torch.testing.assert_close(moe(flat) - plain(flat), skipped @ -moe.experts.down_bias,
                               atol=1e-5, rtol=0)


def test_compensated_model_round_trips_and_is_refused_where_it_cannot_go(tmp_path):
    from checkpoint import save_checkpoint
    from conftest import hf_config_of
    from export import export_problems
    import recursive
    model = converted(tiny_model("llama", 32, 48, 2), n_experts=8, active=0.5, compensate=True)
    assert model.cfg.moe["compensated"] and all(b.mlp.bias is not None for b in model.layers)
    save_checkpoint(model, hf_config_of(model), str(tmp_path / "moe"))
    loaded = modeling.load_model(str(tmp_path / "moe"))
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    problems = export_problems(loaded.cfg)
    assert len(problems) == 1 and "--compensate" in problems[0]
    with pytest.raises(ValueError, match="compensation bias"):
        recursive.check_spec(weaver.ConvertSpec(n_experts=2), loaded.cfg.moe, loaded.cfg)
    with pytest.raises(ValueError, match="no skipped routed experts"):
        weaver.ConvertSpec(method="static", compensate=True)
