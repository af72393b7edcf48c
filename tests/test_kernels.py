"""kernels.py: every path equals `reference` (random shapes, top-k and expert loads, empty experts,
all tokens on one expert), the compiled entry point equals eager with no graph break, and a
converted model gives the same logits through the kernels. GPU tests skip without CUDA."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels

FAST = ["select", "gather", "grouped"]


def problem(n, e, k, d, f, s, load, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w13 = torch.randn(e, 2 * f, d, generator=g) / d ** 0.5
    w2 = torch.randn(e, f, d, generator=g) / f ** 0.5
    shared = (
        None
        if s == 0
        else (
            torch.randn(s, d, generator=g) / d**0.5,
            torch.randn(s, d, generator=g) / d**0.5,
            torch.randn(d, s, generator=g) / s**0.5,
        )
    )
    if load == "random":  # K distinct experts per token, as top-k gives
        idx = torch.rand(n, e, generator=g).argsort(dim=1)[:, :k]
    elif load == "one":  # every token on expert e-1 first; the other slots share the next experts
        idx = (torch.arange(k)[None, :] + e - 1).remainder(e).expand(n, k).contiguous()
    else:  # "skewed": only the first k experts ever used, the rest get no tokens
        idx = torch.stack([torch.randperm(k, generator=g) for _ in range(n)])
    cast = lambda t: t.to(device=device, dtype=dtype)
    shared = None if shared is None else tuple(map(cast, shared))
    return cast(x), idx.to(device), cast(w13), cast(w2), shared


def with_empty_slots(idx: torch.Tensor, seed: int) -> torch.Tensor:
    # as threshold selection leaves them: each token's last slots -1, from none of them to all
    n, k = idx.shape
    taken = torch.randint(0, k + 1, (n, 1), generator=torch.Generator().manual_seed(seed))
    return torch.where(torch.arange(k)[None] < taken, idx, -1)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), e=st.integers(1, 9), data=st.data(), d=st.sampled_from([8, 16, 24]),
       f=st.integers(1, 12), s=st.sampled_from([0, 8]),
       load=st.sampled_from(["random", "one", "skewed"]), weighted=st.booleans(),
       empty=st.booleans(), seed=st.integers(0, 1000))
def test_paths_equal_reference_fp32(n, e, data, d, f, s, load, weighted, empty, seed):
    k = data.draw(st.integers(1, e))
    args = problem(n, e, k, d, f, s, load, seed)
    weights = torch.rand(n, k, generator=torch.Generator().manual_seed(seed)) if weighted else None
    expected = kernels.reference(*args, weights)
    if empty:  # an empty slot adds what a slot of weight 0 adds: nothing
        x, idx, w13, w2, shared = args
        args = (x, with_empty_slots(idx, seed), w13, w2, shared)
        kept = (args[1] >= 0).float() * (1 if weights is None else weights)
        expected = kernels.reference(x, args[1].clamp(min=0), w13, w2, shared, kept)
    for path in FAST if f % 4 == 0 else ["select", "gather"]:  # grouped_mm wants 16-byte rows
        torch.testing.assert_close(
            kernels.PATHS[path](*args, weights), expected, rtol=1e-5, atol=1e-5, msg=path
        )
    torch.testing.assert_close(kernels.moe_ffn(*args, weights), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 24])
def test_paths_have_the_reference_gradients(n):
    # what training differentiates: the input, both weight stacks, the shared GLU, routing weights
    x, idx, w13, w2, shared = problem(n, 6, 2, 16, 8, 8, "random", seed=n)
    weights = torch.rand(n, 2, generator=torch.Generator().manual_seed(1))
    leaves = [x, w13, w2, weights, *shared]

    def grads(path):
        inputs = [t.clone().requires_grad_(True) for t in leaves]
        out = kernels.PATHS[path](
            inputs[0], idx, inputs[1], inputs[2], tuple(inputs[4:]), inputs[3]
        )
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [t.grad for t in inputs]
    expected = grads("reference")
    for path in FAST:
        for got, want in zip(grads(path), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=path)


@pytest.mark.parametrize("n,load", [(1, "random"), (7, "skewed"), (64, "one"), (200, "random")])
def test_paths_equal_reference_bf16(n, load):
    x, idx, w13, w2, shared = problem(n, 8, 3, 64, 16, 32, load, seed=n, dtype=torch.bfloat16)
    truth = kernels.reference(
        x.float(), idx, w13.float(), w2.float(), tuple(t.float() for t in shared)
    )
    scale = truth.abs().max()
    for path in ["reference"] + FAST:
        got = kernels.PATHS[path](x, idx, w13, w2, shared)
        assert got.dtype == torch.bfloat16
        # bf16 keeps 8 bits of mantissa (0.4%); a handful of roundings stay within 1% of the
        # output's scale
        assert (got.float() - truth).abs().max() <= 0.01 * scale, path


def test_dispatcher_picks_from_static_facts(capsys):
    assert kernels.choose_path("cpu", torch.float32, 1, 4, 48, 4096, 224) == "select"
    # the demo's decode: 32 of 96 experts of 12 neurons copy faster than they loop; of 24, not
    assert kernels.choose_path("cpu", torch.float32, 1, 32, 96, 576, 12) == "gather"
    assert kernels.choose_path("cpu", torch.float32, 1, 16, 48, 576, 24) == "select"
    assert kernels.choose_path("cuda", torch.bfloat16, 1, 4, 48, 4096, 224) == "gather"
    # a CPU's eager prefill loops over expert runs; compiled, it takes grouped_mm (bf16) or gather
    assert kernels.choose_path("cpu", torch.float32, 2048, 4, 48, 4096, 224) == "select"
    assert kernels.choose_path("cpu", torch.bfloat16, 2048, 4, 48, 4096, 3, compiled=True) \
        == "gather"
    assert "not 16-byte aligned; prefill uses the slower gather path" in capsys.readouterr().out
    assert kernels.choose_path("cpu", torch.float32, 1, 4, 48, 4096, 224, compiled=True) == "gather"
    assert (
        kernels.choose_path("cpu", torch.bfloat16, 2048, 4, 48, 4096, 224, compiled=True)
        == "grouped"
    )
    assert (
        kernels.choose_path("cpu", torch.float32, 2048, 4, 48, 4096, 224, compiled=True) == "gather"
    )


def test_compiled_layer_has_no_graph_break_and_matches_eager():
    # fullgraph=True raises on any graph break. grouped in bf16 (compiled grouped_mm allows nothing
    # else), gather in fp32
    torch._dynamo.reset()
    from conftest import converted, tiny_model
    model = converted(tiny_model(dim=32, ffn_dim=64, n_layers=1), n_experts=8, active=0.5)
    for path, dtype in (("grouped", torch.bfloat16), ("gather", torch.float32)):
        mlp = model.layers[0].mlp.to(dtype)
        x = torch.randn(3, 10, 32).to(dtype)
        expected = mlp(x)
        got = torch.compile(kernels.layer_forward, fullgraph=True, dynamic=False)(mlp, x, path)
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        else:  # two bf16 computations in different orders: within 1% of the output's scale
            error = (got.float() - expected.float()).abs().max()
            assert error <= 0.01 * expected.float().abs().max()


@pytest.mark.parametrize("compensate", [False, True])
def test_model_through_kernels_matches_reference_model(compensate):
    from conftest import TOKENS, assert_same_greedy, converted, tiny_model
    model = converted(tiny_model("qwen3", ffn_dim=48, n_layers=2), n_experts=8, active=0.5,
                      compensate=compensate)
    expected = model(TOKENS)
    kernels.use_kernels(model, compile=False)
    assert all(b.mlp.kernel is not None for b in model.layers)
    torch.testing.assert_close(model(TOKENS), expected, rtol=1e-5, atol=1e-5)
    greedy = model.generate(TOKENS[:1, :4], 6)  # decode goes through the select path
    kernels.use_kernels(model, None)
    assert_same_greedy(greedy, model.generate(TOKENS[:1, :4], 6),
                       lambda prefix: model(prefix)[:, -1], tol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_a_stock_moe_through_kernels_matches_its_reference(arch, tmp_path):
    """Qwen2-MoE's sigmoid-gated shared expert and a dense layer; Mixtral's renormalised top-2."""
    pytest.importorskip("transformers")
    import model as modeling
    from conftest import assert_same_greedy, make_hf, save_hf
    model = modeling.load_model(save_hf(make_hf(arch), tmp_path))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    expected = model(tokens)
    kernels.use_kernels(model, compile=False)
    assert sum(b.mlp.kernel is not None for b in model.layers if hasattr(b.mlp, "kernel")) >= 2
    torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)
    decode = model.generate(tokens[:1, :4], 4)  # the select path
    kernels.use_kernels(model, None)
    assert_same_greedy(decode, model.generate(tokens[:1, :4], 4),
                       lambda prefix: model(prefix)[:, -1], tol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("n", [1, 16, 512])
def test_cuda_paths_equal_reference(n):
    args = problem(n, 16, 4, 256, 64, 128, "random", seed=n, dtype=torch.bfloat16, device="cuda")
    expected = kernels.reference(*args).float()
    for path in ["gather", "grouped"]:
        torch.testing.assert_close(
            kernels.PATHS[path](*args).float(), expected, rtol=2e-2, atol=2e-2, msg=path
        )


@cuda
def test_cuda_graph_decode_matches_eager():
    from conftest import converted, tiny_model
    model = converted(tiny_model(dim=64, ffn_dim=128, n_layers=1), n_experts=8, active=0.5)
    model = model.cuda().bfloat16()
    mlp = model.layers[0].mlp
    x = torch.randn(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    expected = mlp(x)
    step = kernels.compiled_layer_forward("cuda", True)
    for _ in range(3):  # warm-up runs record the graph, later ones replay it
        got = step(mlp, x, "gather")
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
