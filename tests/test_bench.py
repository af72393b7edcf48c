"""bench.py runs: the FFN timing rows and the synthetic-checkpoint conversion, on tiny shapes. These
check that the benchmarks work and report consistent rows, not how fast anything is."""
import os

import pytest
import torch

import bench


def test_ffn_bench_rows():
    rows = bench.ffn_bench("cpu", "float32", ["demo"], [0.5], [1, 64], ["router", "balanced"], 64,
                           False, 0.01, breakdown=True)
    assert [(r["T"], r["routing"], r["path"]) for r in rows] == [
        (1, "router", "select"),
        (1, "balanced", "select"),
        (64, "router", "grouped"),
        (64, "balanced", "grouped"),
    ]
    for r in rows:
        assert r["dense_ms"] > 0 and r["moe_ms"] > 0 and r["ideal"] > 1
    # T = 1: top_k experts either way
    assert rows[1]["experts_touched"] == rows[0]["experts_touched"]
    assert set(rows[0]["parts_ms"]) == {"router", "shared", "experts"}
    # grouped: its GEMMs alone too
    assert set(rows[2]["parts_ms"]) == {"router", "shared", "experts", "gemms"}
    assert all(t > 0 for r in rows for t in r["parts_ms"].values())


def test_grouped_gemms_compute_the_routed_output():
    # the breakdown's GEMMs-only timing must time the same arithmetic as kernels.grouped, only
    # pre-permuted
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
    import model as M
    moe = M.load_model(out)
    assert moe.cfg.moe["num_experts"] == 64 and moe(torch.arange(8)[None]).shape == (1, 8, 256)


def test_partition_bench_on_a_tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SYNTH_CONFIGS, "tiny", {"hidden_size": 32, "intermediate_size": 128})
    rows = bench.partition_bench("tiny", samples=8, tokens=16, repeats=1)
    assert [(r["router"], r["shared_experts"]) for r in rows] == [
        ("centroid", 45),
        ("centroid", 8),
        ("lsq", 45),
        ("lsq", 8),
    ]
    assert all(r["routed_experts"] == 64 - r["shared_experts"] and r["seconds"] > 0 for r in rows)


def test_router_flops_accounting():
    from conftest import converted, tiny_model
    model = converted(tiny_model(ffn_dim=48, n_layers=2), n_experts=8, active=0.5,
                      router="centroid", dense_layers=(1,))
    layer = model.cfg.moe["layers"][0]
    flops = bench.ffn_flops(model.cfg)
    D = 32
    assert flops["dense"] == 2 * 6 * D * 48
    assert flops["experts"] == 6 * D * (layer["shared_neurons"] + layer["top_k"] * 6) + 6 * D * 48
    assert flops["router"] == 2 * D * layer["routed_experts"]


def test_heal_and_downcycle_run_end_to_end(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    files = {
        "prose": os.path.join(tiny_checkpoint, "prose.txt"),
        "code": os.path.join(tiny_checkpoint, "code.txt"),
    }
    monkeypatch.setattr(bench, "demo_checkpoint", lambda: tiny_checkpoint)
    monkeypatch.setattr(bench, "task_files", lambda data, command: files)
    budget = dict(tokens=64, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    rows = bench.heal("unused", ["expertweaver:lsq:n_experts=8", "static:n_experts=8"], [0.5],
                      budget, 2, 16, val_windows=1, seed=0, val_seqlen=16)
    names = [r["row"] for r in rows]
    assert names == ["dense", "expertweaver:lsq:n_experts=8", "static:n_experts=8"]
    assert all(r["after"].keys() == {"prose", "code"} and r["tok_s"] > 0 for r in rows)
    rows = bench.downcycle("unused", ["expertweaver:centroid", "expertweaver:centroid+keep"],
                           dict(active=0.5, n_experts=8, n_shared=1), {**budget, "min_lr": 1e-3},
                           0.01, 2, 16, val_windows=1, val_every=1, seed=0, plot=None,
                           val_seqlen=16)
    assert [len(r["curve"]) for r in rows] == [3, 3, 3]  # step 0 and both steps
    printed = capsys.readouterr().out
    assert "| `expertweaver:centroid+keep` |" in printed and "val loss at step 0" in printed
    assert [d for d in os.listdir("/tmp") if d.startswith("expertweaver-heal-") or d.startswith(
        "expertweaver-downcycle-")] == []


def test_dive_runs_end_to_end(tiny_checkpoint, monkeypatch, capsys):
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(bench, "demo_checkpoint", lambda: tiny_checkpoint)
    monkeypatch.setattr(bench, "task_files", lambda data, command: files)
    budget = dict(tokens=128, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    rows = bench.dive("unused", ["dive:dive_groups=2", "expertweaver:lsq:n_experts=8"], 0.5, 2,
                      budget, 0.25, 0.05, 4, 16, val_windows=1, seed=0, val_seqlen=16)
    names = [r["row"] for r in rows]
    assert names == ["dense", "dive:dive_groups=2", "expertweaver:lsq:n_experts=8"]
    groups = rows[1]["groups"]
    assert sorted(set(groups)) == [0, 1] and len(groups) == 4  # 2 files x 2 parts
    # per layer two experts of half the FFN, their biases (2, 32) and the lsq router (2, 32 + 1)
    assert rows[1]["ffn_params"] == rows[0]["ffn_params"] + 2 * (2 * 32 + 2 * 33)
    assert "stage0" in rows[1] and "DIVE mining" in capsys.readouterr().out
    assert not [d for d in os.listdir("/tmp") if d.startswith("expertweaver-dive-")]


@pytest.mark.parametrize("rows, parts, samples, message", [
    (["dive"], 0, 4, "--parts 0 must be at least 1"),
    (["dive:dive_groups=5"], 2, 4, "dive_groups 5 is more than the 4 calibration domain"),
    (["dive:dive_groups=2"], 2, 3, "--calib-samples 3"),
    (["dive:bogus=1"], 2, 4, "'bogus' is not a ConvertSpec field"),
])
def test_dive_bad_inputs_before_any_work(tiny_checkpoint, monkeypatch, rows, parts, samples,
                                         message):
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(bench, "task_files", lambda data, command: files)
    monkeypatch.setattr(bench, "demo_checkpoint", lambda: pytest.fail("slow work started"))
    budget = dict(tokens=128, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    with pytest.raises(ValueError, match=message):
        bench.dive("unused", rows, 0.5, parts, budget, 0.25, 0.05, samples, 16, val_windows=1,
                   seed=0)
