"""experiments.py runs: the FLOP accounting, and the training experiments end to end on a tiny
checkpoint. These check that the experiments work and report consistent rows, not their figures."""
import json
import math
import os
import tempfile

import pytest

import experiments
from weaver import ConvertSpec


def test_router_flops_accounting():
    from conftest import converted, tiny_model
    model = converted(tiny_model(ffn_dim=48, n_layers=2), n_experts=8, active=0.5,
                      router="centroid", dense_layers=(1,))
    layer = model.cfg.moe["layers"][0]
    flops = experiments.ffn_flops(model.cfg)
    D = 32
    assert flops["dense"] == 2 * 6 * D * 48
    assert flops["experts"] == 6 * D * (layer["shared_neurons"] + layer["top_k"] * 6) + 6 * D * 48
    assert flops["router"] == 2 * D * layer["routed_experts"]


@pytest.mark.parametrize("active, layout", [(0.75, {}), (0.5, {"router_bias": True}),
                                            (0.75, {"method": "cmoe"}), (0.5, {"n_shared": 1})])
def test_first_dense_pays_for_its_dense_layers_at_the_uniform_flops(active, layout):
    # the k that first_dense leaves the other layers is the largest at which ffn_flops, counted on
    # the converted models, stays within the uniform layout's
    from conftest import converted, tiny_model
    cost = lambda model: (lambda f: f["experts"] + f["router"])(experiments.ffn_flops(model.cfg))
    make = lambda: tiny_model(ffn_dim=48, n_layers=3)
    uniform = cost(converted(make(), n_experts=8, active=active, **layout))
    paid = converted(make(), n_experts=8, active=active, first_dense=1, **layout)
    k = paid.layers[1].mlp.top_k + paid.cfg.moe["layers"][1]["shared_neurons"] // 6
    assert paid.cfg.moe["first_dense"] == 1 and paid.cfg.moe["layers"][0] is None
    assert k < round(active * 8) and cost(paid) <= uniform
    over = converted(make(), n_experts=8, active=(k + 1) / 8, dense_layers=(0,), **layout)
    assert cost(over) > uniform


def test_first_dense_is_refused_where_it_cannot_pay():
    from conftest import tiny_model
    import recursive
    with pytest.raises(ValueError, match="give one or the other"):
        ConvertSpec(first_dense=1, dense_layers=(3,))
    with pytest.raises(ValueError, match="must be at least 0"):
        ConvertSpec(first_dense=-1)
    with pytest.raises(ValueError, match=r"first_dense 1: 1 dense layers of the 2 cost more"):
        ConvertSpec(n_experts=8, active=0.25, first_dense=1).check_layers(48, 2, 32)
    with pytest.raises(ValueError, match=r"n_shared 6 must be in \[0, k = \d\], the k left"):
        ConvertSpec(n_experts=8, active=0.75, n_shared=6, first_dense=1).check_layers(48, 3, 32)
    moe = tiny_model(ffn_dim=48, n_layers=2)
    with pytest.raises(ValueError, match="--first-dense is for a one-level conversion"):
        recursive.check_spec(ConvertSpec(n_experts=2, first_dense=1), {"layers": []}, moe.cfg)


def test_hierarchy_splits_an_exported_moe_and_counts_its_flops(tiny_checkpoint, tmp_path,
                                                               monkeypatch, capsys):
    from test_data import write_tasks
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    pytest.importorskip("transformers")
    (tmp_path / "eval").mkdir()
    write_tasks(tmp_path / "eval")
    # 4 experts of 12 (one shared, the top-1 of three routed), each split into 2 sub-experts of 6
    out = experiments.hierarchy(str(tmp_path), "expertweaver:n_experts=4:n_shared=1", 0.5, 2,
                                [1.0, 0.5], calib_samples=2, calib_seqlen=16, eval_seqlen=16,
                                eval_windows=2, holdout=0.1, seed=0,
                                one_level="expertweaver:n_experts=8", tasks=("piqa", "sciq"))
    outer, whole, one_level, half, one_level_half = out[1:]
    assert whole["tasks"] == outer["tasks"] and set(half["tasks"]) == {"piqa", "sciq"}
    assert outer["ffn_share"] == pytest.approx(0.5) and whole["ffn_share"] == pytest.approx(0.5)
    assert whole["vs_outer"] == pytest.approx(1.0, rel=1e-4)  # every part of an expert computed
    assert half["ffn_share"] == pytest.approx(0.25) == one_level_half["ffn_share"]
    assert half["flops_share"] > half["ffn_share"]  # the routers, both levels
    printed = capsys.readouterr().out
    assert "| its experts split, 0.5 of each active | 25.0% |" in printed
    assert "| `its experts split, 0.5 of each active` | 0.25 |" in printed  # its accuracy


def test_hierarchy_refuses_save_outer_before_any_work(tmp_path):
    (tmp_path / "kept").mkdir()
    args = dict(outer_active=0.5, sub_experts=2, inner=[0.5], calib_samples=2, calib_seqlen=16,
                eval_seqlen=16, eval_windows=2, holdout=0.1, seed=0)
    with pytest.raises(ValueError, match="--save-outer .*kept exists: give a new directory"):
        experiments.hierarchy("unused", "expertweaver", save_outer=str(tmp_path / "kept"), **args)
    with pytest.raises(ValueError, match="--save-outer keeps the outer MoE this run makes"):
        experiments.hierarchy("unused", str(tmp_path), save_outer=str(tmp_path / "new"), **args)
    assert sorted(os.listdir(tmp_path)) == ["kept"]


def test_quality_runs_end_to_end(tiny_checkpoint, monkeypatch, capsys):
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    rows = ["expertweaver:lsq:n_experts=8", "static:n_experts=8"]
    out = experiments.quality("unused", rows, [0.5, 1.0], calib_samples=2, calib_seqlen=16,
                              eval_seqlen=16, eval_windows=2, holdout=0.1, seed=0)
    assert [(r["row"], r.get("active")) for r in out] == [("dense", None)] + [
        (row, active) for active in (0.5, 1.0) for row in rows]
    for r in out[1:]:
        assert r["geomean"] == pytest.approx(math.sqrt(r["ratio"]["prose"] * r["ratio"]["code"]))
        assert r["ppl"]["code"] == pytest.approx(r["ratio"]["code"] * out[0]["ppl"]["code"])
        if r["active"] == 1.0:  # every expert active: the dense model's function
            assert r["ratio"] == pytest.approx({"prose": 1.0, "code": 1.0}, rel=1e-4)
        else:
            assert r["ratio"] != pytest.approx({"prose": 1.0, "code": 1.0}, rel=1e-4)
    assert "| `static:n_experts=8` | 0.50 |" in capsys.readouterr().out


def test_quality_scores_the_tasks_and_the_retained_share(tiny_checkpoint, tmp_path, monkeypatch,
                                                          capsys):
    from test_data import write_tasks
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    (tmp_path / "eval").mkdir()
    write_tasks(tmp_path / "eval")
    out = experiments.quality(str(tmp_path), ["static:n_experts=8"], [1.0], calib_samples=2,
                              calib_seqlen=16, eval_seqlen=16, eval_windows=2, holdout=0.1, seed=0,
                              tasks=("piqa", "sciq"))
    assert out[0]["tasks"] == out[1]["tasks"]  # every neuron kept: the dense model's scores
    assert set(out[1]["tasks"]) == {"piqa", "sciq"} and out[1]["tasks"]["sciq"]["items"] == 1
    assert "retained above chance" in capsys.readouterr().out


def test_served_chooses_on_the_calibration_side_and_runs_the_export(tiny_checkpoint, tmp_path,
                                                                     monkeypatch, capsys):
    pytest.importorskip("transformers")
    from test_data import write_tasks
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    (tmp_path / "eval").mkdir()
    write_tasks(tmp_path / "eval")
    # experts of 12 neurons: transformers' grouped matmul wants rows of a multiple of 16 bytes
    out = experiments.served(str(tmp_path), [0.75], [0.25, 0.5, 0.95], calib_samples=2,
                             calib_seqlen=16, select_samples=6, eval_seqlen=16, eval_windows=2,
                             holdout=0.1, seed=0, tasks=("piqa", "sciq"), n_experts=4)
    ours, export = out[1:]
    assert (ours["runs"], export["runs"]) == ("ours", "export")
    assert list(ours["sweep"]) == [1, 2]  # of k = 3: at least one expert routed
    assert ours["n_shared"] == min(ours["sweep"], key=ours["sweep"].get) == export["n_shared"]
    # the export weights each routed expert within exp(+-2^-11) of ours on calibration-like text
    assert export["ppl"] == pytest.approx(ours["ppl"], rel=1e-2)
    assert set(export["tasks"]) == {"piqa", "sciq"}
    assert "retained above chance" in capsys.readouterr().out
    assert [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("expertweaver-served-")] \
        == []


@pytest.mark.parametrize("select, eval_files, message", [
    (0, True, "--select-samples 0 must be at least 1"),
    (4, False, "piqa_valid.jsonl not found"),
])
def test_served_and_quality_refuse_bad_input_before_any_work(tiny_checkpoint, tmp_path,
                                                             monkeypatch, select, eval_files,
                                                             message):
    from test_data import write_tasks
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda: pytest.fail("slow work started"))
    (tmp_path / "eval").mkdir()
    if eval_files:
        write_tasks(tmp_path / "eval")
    common = dict(calib_samples=2, calib_seqlen=16, eval_seqlen=16, eval_windows=2, holdout=0.1,
                  seed=0, tasks=("piqa",))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        experiments.served(str(tmp_path), [0.75], [0.5], select_samples=select, n_experts=4,
                           **common)
    if not eval_files:
        with pytest.raises(FileNotFoundError, match=message):
            experiments.quality(str(tmp_path), ["static:n_experts=8"], [0.5], **common)


def test_retained_share_pools_tasks_above_chance():
    task = lambda acc, se, chance: {"acc": acc, "acc_stderr": se, "main": "acc", "chance": chance}
    dense = {"a": task(0.80, 0.01, 0.5), "b": task(0.35, 0.02, 0.25), "c": task(0.52, 0.02, 0.5)}
    moe = {"a": task(0.70, 0.01, 0.5), "b": task(0.30, 0.02, 0.25), "c": task(0.40, 0.02, 0.5)}
    share, near = experiments.retained(moe, dense)
    assert near == ["c"]  # 0.52 is within two standard errors of 0.5: left out
    assert share == pytest.approx((0.20 + 0.05) / (0.30 + 0.10))


def test_heal_and_downcycle_run_end_to_end(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    files = {
        "prose": os.path.join(tiny_checkpoint, "prose.txt"),
        "code": os.path.join(tiny_checkpoint, "code.txt"),
    }
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    budget = dict(tokens=64, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    rows = experiments.heal("unused", ["expertweaver:lsq:n_experts=8", "static:n_experts=8"], [0.5],
                      budget, 2, 16, val_windows=1, seed=0, val_seqlen=16)
    names = [r["row"] for r in rows]
    assert names == ["dense", "expertweaver:lsq:n_experts=8", "static:n_experts=8"]
    # each run trained on its 64 tokens in less than its whole time, validation included
    assert all(r["after"].keys() == {"prose", "code"} and 64 / r["tok_s"] < r["seconds"]
               for r in rows)
    rows = experiments.downcycle("unused", ["expertweaver:centroid", "expertweaver:centroid+keep"],
                           dict(active=0.5, n_experts=8, n_shared=1), {**budget, "min_lr": 1e-3},
                           0.01, 2, 16, val_windows=1, val_every=1, seed=0, plot=None,
                           val_seqlen=16)
    assert [len(r["curve"]) for r in rows] == [3, 3, 3]  # step 0 and both steps
    printed = capsys.readouterr().out
    assert "| `expertweaver:centroid+keep` |" in printed and "val loss at step 0" in printed
    assert [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("expertweaver-heal-") or
            d.startswith("expertweaver-downcycle-")] == []


def test_dive_runs_end_to_end(tiny_checkpoint, monkeypatch, capsys):
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda *_: tiny_checkpoint)
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    budget = dict(tokens=128, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    rows = experiments.dive("unused", ["dive:dive_groups=2", "expertweaver:lsq:n_experts=8"],
                            0.5, 2, budget, 0.25, 0.05, 4, 16, val_windows=1, seed=0,
                            val_seqlen=16)
    names = [r["row"] for r in rows]
    assert names == ["dense", "dive:dive_groups=2", "expertweaver:lsq:n_experts=8"]
    groups = rows[1]["groups"]
    assert sorted(set(groups)) == [0, 1] and len(groups) == 4  # 2 files x 2 parts
    # per layer two experts of half the FFN, their biases (2, 32) and the lsq router (2, 32 + 1)
    assert rows[1]["ffn_params"] == rows[0]["ffn_params"] + 2 * (2 * 32 + 2 * 33)
    assert "stage0" in rows[1] and "DIVE mining" in capsys.readouterr().out
    assert not [d for d in os.listdir(tempfile.gettempdir()) if d.startswith("expertweaver-dive-")]


@pytest.mark.parametrize("rows, parts, samples, message", [
    (["dive"], 0, 4, "--parts 0 must be at least 1"),
    (["dive:dive_groups=5"], 2, 4, "dive_groups 5 is more than the 4 calibration domain"),
    (["dive:dive_groups=2"], 2, 3, "--calib-samples 3"),
    (["dive:bogus=1"], 2, 4, "'bogus' is not a DiveSpec field"),
])
def test_dive_bad_inputs_before_any_work(tiny_checkpoint, monkeypatch, rows, parts, samples,
                                         message):
    files = {t: os.path.join(tiny_checkpoint, f"{t}.txt") for t in ("prose", "code")}
    monkeypatch.setattr(experiments, "task_files", lambda data, command: files)
    monkeypatch.setattr(experiments, "demo_checkpoint", lambda: pytest.fail("slow work started"))
    budget = dict(tokens=128, seqlen=16, batch=2, lr=1e-2, holdout=0.1)
    with pytest.raises(ValueError, match=message):
        experiments.dive("unused", rows, 0.5, parts, budget, 0.25, 0.05, samples, 16, val_windows=1,
                   seed=0)


def test_gap_table_finds_its_two_ends_under_any_settings(capsys):
    dense = {"prose": 10.0}
    fake = lambda row, ratio: {"row": row, "active": 0.5, "ratio": {"prose": ratio},
                               "geomean": ratio, "active_flops": 0.5, "router_share": 0.0,
                               "convert_seconds": 1.0}
    results = [fake("expertweaver:centroid:n_experts=64", 3.0),
               fake("expertweaver:oracle:n_experts=64", 2.0), fake("static", 2.5)]
    experiments.print_quality_tables(results, dense)
    gap = capsys.readouterr().out.split("gap closed")[1]
    assert "| `static` | 0.50 | 50% |" in gap and "oracle:n_experts=64` |" not in gap
    experiments.print_quality_tables(results[1:], dense)  # no centroid row: no gap table
    assert "gap closed" not in capsys.readouterr().out


def test_plot_draws_saved_quality_runs_merged_and_refuses_others(tmp_path, monkeypatch):
    def saved(name, command, model, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"command": command, "args": {"model": model},
                                    "rows": [{"row": "dense", "ppl": {}}] + rows}))
        return str(path)
    point = lambda row, flops, ratio: {"row": row, "active_flops": flops, "geomean": ratio}
    a = saved("a.json", "quality", "demo", [point("static", 0.9, 1.2), point("static", 0.5, 4.0)])
    b = saved("b.json", "quality", "demo", [point("expertweaver", 0.76, 1.3)])
    drawn = []
    monkeypatch.setattr(experiments, "draw",
                        lambda file, lines, *labels, **kw: drawn.append(lines))
    experiments.replot([a, b], str(tmp_path / "f.png"), None)
    assert drawn.pop() == [("static", (50.0, 90.0), (4.0, 1.2)), ("expertweaver", (76.0,), (1.3,))]
    experiments.replot([a, b], str(tmp_path / "f.png"), ["expertweaver"])
    assert [line[0] for line in drawn.pop()] == ["expertweaver"]
    with pytest.raises(ValueError, match="--rows cmoe: not in"):
        experiments.replot([a], str(tmp_path / "f.png"), ["cmoe"])
    with pytest.raises(ValueError, match="not the --json of a quality run"):
        experiments.replot([saved("c.json", "heal", "demo", [])], str(tmp_path / "f.png"), None)
    with pytest.raises(ValueError, match="runs on different models"):
        experiments.replot([a, saved("d.json", "quality", "demo-gemma", [])], "f.png", None)


def test_a_rows_seed_reseeds_the_partition_and_active_is_refused():
    specs = experiments.row_specs(["expertweaver", "expertweaver:seed=5"], [0.5], seed=2)
    assert [s.seed for s in specs.values()] == [2, 5]
    with pytest.raises(ValueError, match="--active's"):
        experiments.row_specs(["expertweaver:active=0.3"], [0.5], seed=0)
