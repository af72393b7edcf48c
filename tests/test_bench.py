"""bench.py runs: the FFN timing rows and the synthetic-checkpoint conversion, on tiny shapes. These check
that the benchmarks work and report consistent rows, not how fast anything is."""
import os

import pytest
import torch

import bench


def test_ffn_bench_rows():
    rows = bench.ffn_bench("cpu", "float32", ["demo"], [0.5], [1, 64], ["router", "balanced"], 64, False, 0.01)
    assert [(r["T"], r["routing"], r["path"]) for r in rows] == [
        (1, "router", "select"), (1, "balanced", "select"), (64, "router", "grouped"), (64, "balanced", "grouped")]
    for r in rows:
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["ideal"] > 1
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
    assert rows[1]["experts_touched"] == rows[0]["experts_touched"]  # T = 1: top_k experts either way


def test_convert_bench_on_a_tiny_synthetic_model(tmp_path, monkeypatch):
    tiny = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False}
    monkeypatch.setitem(bench.SYNTH_CONFIGS, "tiny", tiny)
    bench.synth_checkpoint("tiny", None, str(tmp_path / "tiny-all"))  # here, not in a child that lacks "tiny"
    row = bench.convert_bench("tiny", None, str(tmp_path), samples=2, seqlen=16, tasks=2, device="cpu",
                              dtype="float32", keep=True)
    assert row["layers"] == 2 and row["peak_rss_gib"] > 0
    assert {"embed", "load", "forward", "profile", "partition", "router", "build", "write"} <= set(row["timings"])
    out = os.path.join(str(tmp_path), "tiny-all-moe")
    import model as M
    moe = M.load_model(out)
    assert moe.cfg.moe["num_experts"] == 64 and moe(torch.arange(8)[None]).shape == (1, 8, 256)
