"""DIVE (weaver.py --method dive): domain mining on a planted case, the one-group layer that is the
dense FFN, overlapping experts with biases through the kernels, save/load and training, bad
inputs."""
import copy
import json

import pytest
import torch

import convert
import kernels
import model as modeling
import train
import weaver
from data import Calibration, calibration_from_files
from dive import DiveSpec, affinity_groups
from export import export_problems
from checkpoint import save_checkpoint
from conftest import (TOKENS, convert_main, hf_config_of, random_calibration, tiny_data,
                      tiny_model)

quiet = dict(log=lambda *_: None)


def planted_calibration(samples=8, seqlen=16, seed=0) -> Calibration:
    # domains 0 and 2 read one half of the vocabulary, 1 and 3 the other: pruned alike in pairs
    g = torch.Generator().manual_seed(seed)
    halves = [(0, 32), (32, 64), (0, 32), (32, 64)]
    tokens = torch.cat([torch.randint(lo, hi, (samples, seqlen), generator=g) for lo, hi in halves])
    return Calibration(tokens, torch.arange(4).repeat_interleave(samples), ["a", "b", "a2", "b2"])


def test_mining_groups_the_domains_that_share_text():
    model = tiny_model(n_layers=2)
    report = convert.convert_model(model, planted_calibration(),
                       DiveSpec(active=0.5, dive_groups=2), **quiet)
    assert report["dive"]["groups"] == [0, 1, 0, 1]
    ppl = torch.tensor(report["dive"]["cross_ppl"])
    assert ppl.shape == (4, 4) and (ppl > 1).all()
    assert model.cfg.moe["layers"][0] == {"shared_neurons": 0, "routed_experts": 2, "top_k": 1}


def test_affinity_groups_merge_the_most_correlated_first():
    ppl = torch.tensor([[1.0, 3.0, 2.0], [1.1, 3.3, 2.0], [2.0, 1.0, 1.5]])
    assert affinity_groups(ppl, 2) == [0, 0, 1]
    assert affinity_groups(ppl, 3) == [0, 1, 2] and affinity_groups(ppl, 1) == [0, 0, 0]


def glu_rounding_bound(x, w_gate, w_up, w_down):
    """How far two float32 evaluations of the GLU down(silu(x Wg^T) * x Wu^T) may differ when
    their matmuls sum in different orders (BLAS picks its kernel by shape, layout and CPU: a fused
    (2F, D) gate/up matmul and stored (F, D) output rows against nn.Linear's). Each dot product of
    n terms is within gamma_n = n u / (1 - n u) times the sum of its terms' magnitudes of the exact
    value (u = 2^-24); propagated through silu (slope below 1.1) and the product, then doubled:
    both sides carry such an error. x (N, D) -> (N, D)."""
    gamma = lambda n: n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    D, F = w_gate.shape[1], w_gate.shape[0]
    g, u = x @ w_gate.T, x @ w_up.T  # (N, F)
    s = torch.nn.functional.silu(g)
    eg, eu = gamma(D) * (x.abs() @ w_gate.abs().T), gamma(D) * (x.abs() @ w_up.abs().T)
    es = 1.1 * eg + 4 * 2.0 ** -24 * s.abs()  # silu's own rounding: a few ulps
    h = s * u
    eh = es * u.abs() + s.abs() * eu + es * eu + 2.0 ** -24 * h.abs()
    return 2 * (gamma(F) * (h.abs() @ w_down.abs().T) + eh @ w_down.abs().T)


def test_one_group_keeping_every_neuron_is_the_dense_ffn():
    # the same function as the dense FFN, up to the rounding of summing in another order: a stacked
    # expert is not nn.Linear, and on some CPUs (AVX-512) the two round differently
    model = tiny_model(n_layers=2)
    dense = [copy.deepcopy(block.mlp) for block in model.layers]
    inputs = []
    hooks = [block.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].flatten(0, 1)))
             for block in model.layers]
    model(TOKENS)
    for hook in hooks:
        hook.remove()
    convert.convert_model(model, random_calibration(samples=4),
              DiveSpec(active=1.0, dive_groups=1), **quiet)
    for block, mlp, x in zip(model.layers, dense, inputs):
        experts = block.mlp.experts
        assert experts.gate_up_proj.shape[:2] == (1, 2 * 48)
        assert torch.equal(experts.down_bias, torch.zeros(1, 32))  # no neuron is left out
        bound = glu_rounding_bound(x, mlp.gate_proj.weight, mlp.up_proj.weight,
                                   mlp.down_proj.weight)
        with torch.no_grad():
            expected = mlp(x)
            difference = (block.mlp(x) - expected).abs()
        assert (difference <= bound).all(), (difference - bound).max()
        # and the bound means something: below 1e-3 of the output, less than a neuron adds
        assert bound.mean() < 1e-3 * expected.abs().mean()


def test_bias_stands_in_for_the_pruned_neurons_on_average():
    # an expert's output + bias has the dense FFN's mean output on its group's tokens
    model = tiny_model(n_layers=1)
    calib = random_calibration(samples=4)
    dense_mlp = model.layers[0].mlp
    inputs = []
    hook = dense_mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    model(calib.tokens)
    hook.remove()
    x = inputs[0]  # (S, T, D)
    dense = dense_mlp(x)
    convert.convert_model(model, calib,
              DiveSpec(active=0.5, dive_groups=2, dive_assign=(0, 1)), **quiet)
    experts = model.layers[0].mlp.experts
    for g in range(2):
        rows = calib.task == g
        got = experts.output(x[rows].reshape(-1, 32), g).mean(dim=0)
        torch.testing.assert_close(got, dense[rows].reshape(-1, 32).mean(dim=0), rtol=1e-4,
                                   atol=1e-5)


def dive_model(top_k=2, groups=3):
    model = tiny_model(n_layers=2)
    calib = random_calibration(tasks=4, samples=4)
    convert.convert_model(model, calib, DiveSpec(active=0.5, dive_groups=groups, dive_top_k=top_k),
                          **quiet)
    return model


@pytest.mark.parametrize("path", ["select", "gather", "grouped"])
def test_kernel_paths_on_overlapping_experts_with_biases(path):
    model = dive_model()
    mlp = model.layers[0].mlp
    assert mlp.experts.down_bias.abs().max() > 0
    assert len(mlp.neuron_index.unique()) < len(mlp.neuron_index)  # the experts share neurons
    for n in (1, 40):
        x = torch.randn(n, 32, generator=torch.Generator().manual_seed(n))
        if path == "grouped" and not kernels.grouped_mm_works("cpu", torch.float32):
            pytest.skip("grouped_mm unavailable on this CPU build")
        torch.testing.assert_close(
            kernels.layer_forward(mlp, x, path), mlp(x), rtol=1e-5, atol=1e-5
        )


def test_checkpoint_round_trip_and_streamed_conversion(tiny_checkpoint, tmp_path):
    spec = DiveSpec(active=0.5, dive_groups=2)
    report = convert_main(tiny_checkpoint, str(tmp_path / "dive"), spec,
                          tiny_data(tiny_checkpoint, samples=8))
    moe = modeling.load_model(str(tmp_path / "dive"))
    layout = moe.cfg.moe
    assert layout["pruned_experts"] and layout["routing"] == "softmax" and layout["norm_topk"]
    assert report["active_fraction"] == 0.5
    saved = json.load(open(tmp_path / "dive" / "report.json"))
    assert len(saved["dive"]["groups"]) == 2 and len(saved["dive"]["cross_ppl"]) == 2
    # the streamed result equals converting the loaded dense model in memory, same calibration
    dense = modeling.load_model(tiny_checkpoint)
    calib = calibration_from_files(
        modeling.load_tokenizer(tiny_checkpoint),
        [f"{tiny_checkpoint}/prose.txt", f"{tiny_checkpoint}/code.txt"], 8, 32, 0, 0.1)
    convert.convert_model(dense, calib, spec, **quiet)
    assert torch.equal(moe(TOKENS), dense(TOKENS))


def test_dense_routing_runs_every_expert_in_training_only():
    model = dive_model(top_k=1)
    mlp = model.layers[0].mlp
    x = torch.randn(5, 32)
    topk = mlp(x)
    train.install_recording(model, temperature=0.5)
    assert torch.equal(mlp(x), topk)  # evaluation routes top-k
    mlp.train()
    probs = (mlp.router(x, mlp.experts) / 0.5).softmax(dim=-1)
    expected = sum(probs[:, e:e + 1] * mlp.experts.output(x, e) for e in range(3))
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)
    assert mlp.load.sum() == 5  # the load logged is what top-1 would pick


def test_two_stage_retraining(tiny_checkpoint, tmp_path):
    spec = DiveSpec(active=0.5, dive_groups=2, router="random")
    convert_main(tiny_checkpoint, str(tmp_path / "dive"), spec,
                 tiny_data(tiny_checkpoint, samples=8))
    data = (f"{tiny_checkpoint}/prose.txt", f"{tiny_checkpoint}/code.txt")
    common = dict(data=data, seqlen=16, batch=4, steps=3, lr=1e-2, warmup=0)
    before = modeling.load_model(str(tmp_path / "dive")).layers[0].mlp.router.weight.clone()
    train.train(str(tmp_path / "dive"), str(tmp_path / "s0"),
            train.TrainSpec(train=("router",), dense_routing=0.5, **common),
            train.RunSpec(val_seqlen=16, val_windows=1, device="cpu"), **quiet)
    router = modeling.load_model(str(tmp_path / "s0")).layers[0].mlp.router.weight
    assert not torch.equal(router, before)
    train.train(str(tmp_path / "s0"), str(tmp_path / "s1"),
            train.TrainSpec(train=("lora", "router", "norms"), lora_alpha=16, **common),
            train.RunSpec(val_seqlen=16, val_windows=1, device="cpu"), **quiet)
    assert modeling.load_model(str(tmp_path / "s1")).cfg.moe["pruned_experts"]


@pytest.mark.parametrize("spec, message", [
    (dict(dive_groups=3), "dive_groups 3 is more than the 2 calibration domain"),
    (dict(dive_groups=2, dive_top_k=3), "dive_top_k 3 must be in"),
    (dict(router="centroid"), "router 'centroid' does not go with method 'dive'"),
    # each expert keeps active / top-k of d_ff
    (dict(active=1.5), r"active 1.5 must be in \(0, 1\]"),
])
def test_bad_inputs_one_line_before_any_work(tiny_checkpoint, tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        convert_main(tiny_checkpoint, str(tmp_path / "out"), DiveSpec(**spec),
                     tiny_data(tiny_checkpoint))
    assert not (tmp_path / "out").exists()


def test_random_router_is_dive_only_and_read_under_its_old_name(tmp_path):
    with pytest.raises(ValueError, match="router 'random' does not go with method 'expertweaver'"):
        weaver.ConvertSpec(router="random")
    model = tiny_model(n_layers=2)
    convert.convert_model(model, random_calibration(tasks=4, samples=4),
                          DiveSpec(active=0.5, dive_groups=2, router="random"), **quiet)
    save_checkpoint(model, hf_config_of(model), str(tmp_path / "old"))
    with open(tmp_path / "old" / "config.json") as f:
        config = json.load(f)
    assert config["moe"]["router"] == "random"
    config["moe"]["router"] = "linear"  # as checkpoints written before 2026-12 name it
    with open(tmp_path / "old" / "config.json", "w") as f:
        json.dump(config, f)
    old = modeling.load_model(str(tmp_path / "old"))
    assert old.cfg.moe["router"] == "random" and torch.equal(old(TOKENS), model(TOKENS))


def test_dive_is_refused_by_the_qwen2_moe_export():
    problems = export_problems(tiny_model().cfg, DiveSpec(router_bias=False))
    assert any("bias each" in p for p in problems)


def test_mining_needs_a_held_out_window_per_domain(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="at least 4 windows per domain"):
        convert_main(tiny_checkpoint, str(tmp_path / "out"),
                     DiveSpec(dive_groups=2),
                     tiny_data(tiny_checkpoint, samples=3))
    assert not (tmp_path / "out").exists()
