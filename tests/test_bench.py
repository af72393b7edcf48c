"""bench.py runs: the FFN timing rows and the synthetic-checkpoint conversion, on tiny shapes. These
check that the benchmarks work and report consistent rows, not how fast anything is."""
import os

import pytest
import torch

import bench


def test_ffn_bench_rows():
    rows = bench.ffn_bench("cpu", "float32", ["demo"], [0.5], [1, 64], ["router", "balanced"], 64,
                           False, 0.01, breakdown=True)
    rows += bench.ffn_bench("cpu", "float32", ["demo"], [0.5], [1, 64], ["router"], 64, False,
                            0.01, breakdown=True, paths=["grouped"])
    assert [(r["T"], r["routing"], r["path"]) for r in rows] == [
        (1, "router", "select"),
        (1, "balanced", "select"),
        (64, "router", "select"),  # a CPU's eager prefill path
        (64, "balanced", "select"),
        (1, "router", "grouped"),  # as asked
        (64, "router", "grouped"),
    ]
    for r in rows:  # the derived figures follow from the timed ones
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["moe_ms"]) and r["ideal"] > 1
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
    # T = 1: top_k experts either way
    assert rows[1]["experts_touched"] == rows[0]["experts_touched"]
    assert set(rows[0]["parts_ms"]) == {"router", "shared", "experts"}
    # grouped: its GEMMs alone too
    assert set(rows[2]["parts_ms"]) == {"router", "shared", "experts"}
    assert set(rows[5]["parts_ms"]) == {"router", "shared", "experts", "gemms"}
    assert all(r["moe_page_faults"] >= 0 for r in rows)  # counted on a CPU with --breakdown


def test_split_bench_rows(monkeypatch):
    monkeypatch.setitem(bench.MOE_SHAPES, "tiny", (32, 6, 16, 2))
    rows = bench.split_bench(["tiny"], [0.5], 4, [1, 64], 0.01)
    # experts of 16 floats x 32 copy faster than they loop: decode gathers them
    assert [(r["T"], r["paths"][0]) for r in rows] == [(1, "gather"), (64, "select")]
    for r in rows:  # 2 of 4 parts of 4 neurons: one shared, the top-1 of three routed
        assert r["speedup"] == pytest.approx(r["moe_ms"] / r["split_ms"])
        assert r["ideal"] == pytest.approx((6 * 32 * 2 * 16 + 2 * 32 * 6) /
                                           (6 * 32 * 2 * 8 + 2 * 32 * 6 + 2 * 32 * 6 * 3))
    # the split layer computes the two-level function its reference does
    layer = bench.random_moe(32, 6, 16, 2, {"shared_neurons": 4, "routed_experts": 3,
                                            "expert_dim": 4, "top_k": 1, "router": "lsq"}, 0)
    x = torch.randn(5, 32)
    torch.testing.assert_close(bench.kernels.layer_forward(layer, x, "gather"), layer(x))


def test_grouped_gemms_compute_the_routed_output():
    # the breakdown's GEMMs-only timing must time kernels.grouped's arithmetic, pre-permuted
    g = torch.Generator().manual_seed(0)
    x, w13, w2 = (
        torch.randn(40, 32, generator=g),
        torch.randn(6, 16, 32, generator=g),
        torch.randn(6, 8, 32, generator=g),
    )
    idx = torch.randint(0, 6, (40, 2), generator=g)
    order = idx.flatten().argsort(stable=True)
    routed = (
        torch.empty(80, 32)
        .index_copy_(0, order, bench.grouped_gemms(x, idx, w13, w2)())
        .view(40, 2, 32)
        .sum(1)
    )
    torch.testing.assert_close(routed, bench.kernels.grouped(x, idx, w13, w2), rtol=1e-5, atol=1e-5)


def test_convert_bench_on_a_tiny_synthetic_model(tmp_path, monkeypatch):
    tiny = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    monkeypatch.setitem(bench.SYNTH_CONFIGS, "tiny", tiny)
    # here, not in a child process that lacks "tiny"
    bench.synth_checkpoint("tiny", None, str(tmp_path / "tiny-all"))
    row = bench.convert_bench("tiny", None, str(tmp_path), samples=2, seqlen=16, tasks=2,
                              device="cpu", dtype="float32", keep=True)
    assert row["layers"] == 2
    assert {"embed", "load", "forward", "profile", "partition", "router", "build", "write"} <= set(
        row["timings"]
    )
    out = os.path.join(str(tmp_path), "tiny-all-moe")
    import model as modeling
    moe = modeling.load_model(out)
    assert moe.cfg.moe["num_experts"] == 128 and moe(torch.arange(8)[None]).shape == (1, 8, 256)


def test_a_synthetic_stock_moe_is_written_per_expert_and_split_streaming(tmp_path, monkeypatch):
    tiny = {**bench.SYNTH_CONFIGS["qwen3-moe-16l"], "hidden_size": 32, "intermediate_size": 64,
            "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": 16, "vocab_size": 256}
    monkeypatch.setitem(bench.SYNTH_CONFIGS, "tiny-moe", tiny)
    source = bench.synth_checkpoint("tiny-moe", None, str(tmp_path / "tiny-moe-all"))
    from safetensors import safe_open
    with safe_open(os.path.join(source, "model.safetensors"), "pt") as f:  # Qwen3-MoE's own names
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in f.keys()
        assert f.get_tensor("model.layers.0.self_attn.q_norm.weight").eq(1).all()
    row = bench.convert_bench("tiny-moe", None, str(tmp_path), samples=2, seqlen=16, tasks=2,
                              device="cpu", dtype="float32", keep=True, n_experts=2)
    assert row["layers"] == 2 and row["peak_rss_gib"] > 0
    import model as modeling
    split = modeling.load_model(source + "-moe")
    for layer in split.cfg.moe["layers"]:  # each expert of 16 neurons in two parts of 8
        parts = layer["split"]
        assert parts["expert_dim"] == 8
        assert parts["shared_neurons"] + 8 * parts["routed_experts"] == 16
    assert split(torch.arange(8)[None]).shape == (1, 8, 256)


def test_partition_bench_on_a_tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SYNTH_CONFIGS, "tiny", {"hidden_size": 32, "intermediate_size": 128})
    rows = bench.partition_bench("tiny", samples=8, tokens=16, repeats=1)
    assert [(r["router"], r["shared_experts"]) for r in rows] == [
        ("centroid", 45),
        ("centroid", 8),
        ("lsq", 45),
        ("lsq", 8),
    ]
    assert all(r["routed_experts"] == 64 - r["shared_experts"] for r in rows)
    assert all(r["seconds"] == pytest.approx(r["partition"] + r["router_seconds"]) for r in rows)


def test_synth_refuses_a_tokenizer_source_without_one_before_writing(tmp_path):
    out = tmp_path / "synth"
    with pytest.raises(ValueError, match="--tokenizer .*: no tokenizer.json in"):
        bench.synth_checkpoint("tiny", None, str(out), tokenizer=str(tmp_path))
    assert os.listdir(tmp_path) == []
