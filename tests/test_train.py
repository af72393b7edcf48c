"""train.py and the routing modes: scaled at gamma 0 is sum bit for bit, the weighted routings
train the router, adapters equal their merged weights, a step lowers the loss, resume and
torchrun match one uninterrupted process, and bad input fails in one line before any work,
leaving nothing behind."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model as modeling
import train
import checkpoint as ckpt
from checkpoint import CheckpointWriter, save_checkpoint, save_safetensors
from conftest import ROOT, TOKENS, converted, hf_config_of, make_hf, save_hf, tiny_model

# ---- routing modes


def test_scaled_at_gamma_zero_is_sum_bit_for_bit_and_weighted_routings_train_the_router():
    model = converted(tiny_model(n_layers=2), n_experts=8, active=0.5)
    expected = model(TOKENS)
    train.set_routing(model, "scaled")
    assert all(m.router.gamma.item() == 0 for m in train.moe_layers(model))
    assert torch.equal(model(TOKENS), expected)
    model.train()
    model(TOKENS).square().mean().backward()
    layer = train.moe_layers(model)[0]
    # gamma first, then the router
    assert layer.router.gamma.grad != 0 and not layer.router.weight.grad.any()
    with torch.no_grad():
        layer.router.gamma.fill_(0.5)
    model.zero_grad()
    model(TOKENS).square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    train.set_routing(model, "softmax", norm_topk=True)
    train.install_recording(model)
    model.zero_grad()
    model(TOKENS).square().mean().backward()
    assert all(m.router.weight.grad.abs().sum() > 0 and m.balance_loss is not None
               for m in train.moe_layers(model))
    _, weights = layer.route(torch.randn(5, 32))
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))


def test_the_sliced_loss_equals_the_whole_one_with_its_gradients(monkeypatch):
    """Above LOSS_LOGITS the output projection runs on checkpointed slices of positions (Gemma's
    vocabulary): the same loss and gradients as the logits formed whole."""
    model = converted(tiny_model(n_layers=2), n_experts=8, active=0.5)
    objective = train.NextTokenLoss(model)
    tokens = torch.cat([TOKENS, TOKENS.flip(1)])  # (4, 12)

    def loss_and_grads():
        model.zero_grad()
        loss = objective(tokens)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    whole, whole_grads = loss_and_grads()
    vocab = model.lm_head.weight.shape[0]
    monkeypatch.setattr(train, "LOSS_LOGITS", 5 * vocab)  # slices of 5 positions, the last short
    assert (tokens.shape[1] - 1) * 4 % 5 != 0
    sliced, sliced_grads = loss_and_grads()
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=0)
    assert len(sliced_grads) == len(whole_grads) > 0
    for got, expected in zip(sliced_grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm_topk", [False, True])
def test_keep_function_starts_at_the_sum_model(norm_topk):
    model = converted(tiny_model(n_layers=2), n_experts=8, active=0.5, router="lsq")
    x = torch.randn(50, 32) * 3
    before = [m.route(x)[0] for m in train.moe_layers(model)]
    expected = model(TOKENS)
    train.set_routing(model, "softmax", norm_topk=norm_topk, keep_function=True, eps=1e-3)
    for m, idx in zip(train.moe_layers(model), before):
        got, weights = m.route(x)
        assert torch.equal(got, idx)  # the same experts
        scale = m.top_k if norm_topk else m.experts.down_proj.shape[0]
        # every weight within exp(+-eps) of 1/scale
        assert ((weights * scale).log().abs() <= 1e-3 + 1e-6).all()
    torch.testing.assert_close(model(TOKENS), expected, rtol=2e-3, atol=2e-3)


def test_routing_is_stored_in_config_and_loaded(tmp_path):
    model = converted(tiny_model(n_layers=2), n_experts=8, active=0.5)
    train.set_routing(model, "scaled")
    train.add_select_bias(model)
    with torch.no_grad():
        for m in train.moe_layers(model):
            m.router.gamma.fill_(0.3)
            m.router.select_bias.copy_(torch.linspace(-1, 1, len(m.router.select_bias)))
    save_checkpoint(model, hf_config_of(model), str(tmp_path))
    loaded = modeling.load_model(str(tmp_path))
    assert loaded.cfg.moe["routing"] == "scaled" and loaded.cfg.moe["select_bias"] is True
    assert torch.equal(loaded(TOKENS), model(TOKENS))
    # gamma was a scalar before FSDP2 (which shards none) made it (1,): such checkpoints still load
    file = os.path.join(str(tmp_path), "model.safetensors")
    tensors = load_file(file)
    gammas = [n for n in tensors if n.endswith("gamma")]
    assert gammas and all(tensors[n].shape == (1,) for n in gammas)
    save_safetensors({n: t.reshape(()) if n in gammas else t for n, t in tensors.items()}, file)
    assert torch.equal(modeling.load_model(str(tmp_path))(TOKENS), model(TOKENS))

# ---- LoRA


def test_lora_model_equals_the_merged_one():
    model = converted(tiny_model("qwen2", n_layers=2), n_experts=8, active=0.5)
    train.add_lora(model, rank=3, alpha=6.0, seed=0)
    with torch.no_grad():  # B starts at zero; give every adapter a real update
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.1)
    wrapped = model(TOKENS)
    merged = converted(tiny_model("qwen2", n_layers=2), n_experts=8, active=0.5)
    merged.load_state_dict(train.merged_state(model, model.state_dict()), strict=True)
    assert not torch.equal(
        merged(TOKENS), converted(tiny_model("qwen2", n_layers=2), n_experts=8, active=0.5)(TOKENS)
    )
    torch.testing.assert_close(merged(TOKENS), wrapped, rtol=1e-6, atol=1e-6)
    targets = train.lora_targets(model)
    # gate_up and down of both layers
    assert sum(1 for m, _ in targets if isinstance(m, modeling.Experts)) == 4

# ---- training runs on a tiny checkpoint


def data_of(checkpoint):
    return (os.path.join(checkpoint, "prose.txt"), os.path.join(checkpoint, "code.txt:code"))


def tiny_spec(data, **spec):
    return train.TrainSpec(
        **{"data": data, "seqlen": 16, "batch": 2, "steps": 4, "lr": 1e-2, "warmup": 1, **spec}
    )


def run(checkpoint, out, data, **kwargs):
    spec = {k: v for k, v in kwargs.items() if k in train.TrainSpec.__dataclass_fields__}
    log = kwargs.pop("log", lambda *_: None)
    options = {k: v for k, v in kwargs.items() if k not in spec}
    run = train.RunSpec(**{"val_seqlen": 16, "val_windows": 2, "val_every": 2, "device": "cpu",
                           **options})
    return train.train(checkpoint, out, tiny_spec(data, **spec), run, log=log)


def all_tensors(path):
    files = sorted(set(modeling.tensor_locations(path).values()))
    return {n: t for f in files for n, t in load_file(f).items()}


def test_a_step_lowers_the_loss_on_its_batch(tiny_checkpoint, tmp_path):
    rows = run(tiny_checkpoint, str(tmp_path / "out"), data_of(tiny_checkpoint),
               train=("lora", "norms"), steps=1)
    spec = tiny_spec(data_of(tiny_checkpoint), steps=1)
    windows, _ = train.load_data(modeling.load_tokenizer(tiny_checkpoint), spec, 16)
    batch = windows[train.batch_windows(len(windows), 0, 0, 2, 1, 0, 1, 0)]

    def loss(path):
        logits = modeling.load_model(path)(batch)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 64),
                                                 batch[:, 1:].reshape(-1)).item()
    # the logged loss is that batch's
    assert rows[1]["loss"] == pytest.approx(loss(tiny_checkpoint), rel=1e-5)
    assert loss(str(tmp_path / "out")) < loss(tiny_checkpoint)


def test_moe_training_writes_a_loadable_checkpoint_and_a_log(tiny_checkpoint, tiny_moe, tmp_path):
    out = str(tmp_path / "healed")
    rows = run(
        tiny_moe,
        out,
        data_of(tiny_checkpoint),
        train=("lora", "router"),
        routing="softmax",
        balance=0.01,
        bias_balance=1e-3,
    )
    assert sorted(os.listdir(out)) == [".expertweaver", "config.json", "model.safetensors",
                                       "tokenizer.json", "train_log.jsonl", "train_state.json",
                                       "train_state.safetensors"]
    model = modeling.load_model(out)
    assert model.cfg.moe["routing"] == "softmax" and model.cfg.moe["select_bias"]
    # the balancing moved them
    assert any(m.router.select_bias.abs().sum() > 0 for m in train.moe_layers(model))
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(r["balance"] > 0 and r["load_max_over_mean"] >= 1 for r in steps)
    assert [r["step"] for r in rows if "val_ppl" in r] == [0, 2, 4]
    assert len(open(os.path.join(out, "train_log.jsonl")).readlines()) == len(rows)


def test_a_stock_moe_trains_and_our_checkpoint_of_it_loads_back(tiny_checkpoint, tmp_path):
    """A HF Qwen2-MoE (its per-expert tensors, gated shared expert, a dense layer) written in our
    layout computes what it did, and heals with its own softmax routing."""
    path = save_hf(make_hf("qwen2_moe"), tmp_path / "stock")
    shutil.copy(os.path.join(tiny_checkpoint, "tokenizer.json"), path)
    stock = modeling.load_model(path)
    save_checkpoint(stock, modeling.load_config(path)[1], str(tmp_path / "ours"))
    ours = modeling.load_model(str(tmp_path / "ours"))
    assert ours.cfg.stock_moe is None and ours.cfg.moe["method"] == "stock"
    assert torch.equal(ours(TOKENS), stock(TOKENS))
    rows = run(path, str(tmp_path / "healed"), data_of(tiny_checkpoint), steps=2)
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    healed = modeling.load_model(str(tmp_path / "healed"))
    assert healed.cfg.moe["routing"] == "softmax" and healed.cfg.moe["shared_gate"]
    assert not torch.equal(healed(TOKENS), stock(TOKENS))


def killed_after_step_2(monkeypatch, checkpoint, out, data, **kwargs):
    """A run killed right after its step-2 save."""
    save = train.save

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint, out, data, save_every=2, **kwargs)
    monkeypatch.setattr(train, "save", save)
    assert json.load(open(os.path.join(out, "train_state.json")))["step"] == 2


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_checkpoint, tiny_moe, tmp_path,
                                                          monkeypatch):
    data, heal = data_of(tiny_checkpoint), dict(train=("lora", "router"), routing="scaled")
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    run(tiny_moe, straight, data, **heal)
    killed_after_step_2(monkeypatch, tiny_moe, broken, data, **heal)
    run(tiny_moe, broken, data, resume=True, **heal)
    a, b = all_tensors(straight), all_tensors(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    log = lambda path: [json.loads(line) for line in open(os.path.join(path, "train_log.jsonl"))]
    assert log(straight) == [{**r, "tok_s": a["tok_s"]} if "tok_s" in r else r
                             for r, a in zip(log(broken), log(straight))]
    with pytest.raises(ValueError, match="trained with lr = 0.01, this run asks for 0.02"):
        run(tiny_moe, broken, data, resume=True, lr=2e-2, **heal)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_match_one(tiny_checkpoint, tiny_moe, tmp_path):
    data = data_of(tiny_checkpoint)
    common = [
        "--train",
        "lora,router",
        "--routing",
        "softmax",
        "--seqlen",
        "16",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--val-seqlen",
        "16",
        "--val-windows",
        "2",
        "--bias-balance",
        "1e-3",
    ]
    common += [arg for d in data for arg in ("--data", d)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run(
        [sys.executable, "train.py", tiny_moe, "--out", str(tmp_path / "one"), "--batch", "4",
         *common],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "train.py",
            tiny_moe,
            "--out",
            str(tmp_path / "two"),
            "--batch",
            "2",
            *common,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "with DDP on 2 processes" in two.stdout
    a, b = all_tensors(str(tmp_path / "one")), all_tensors(str(tmp_path / "two"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)

# ---- bad input


def test_bad_input_fails_before_any_work(tiny_checkpoint, tiny_moe, tmp_path):
    data = data_of(tiny_checkpoint)
    cases = [
        (dict(data=()), tiny_checkpoint, "--data: give at least one text file"),
        (dict(data=data, seqlen=5000, train=("lora",)), tiny_checkpoint,
         r"prose.txt: \d+ tokens .* make no window of --seqlen 5000"),
        (dict(data=data, routing="softmax"), tiny_checkpoint, "--routing applies to an MoE "
                                                              "checkpoint; this one is dense"),
        (dict(data=data, train=("router",)), tiny_checkpoint, "--train router applies to an MoE "
                                                              "checkpoint"),
        (dict(data=data, train=("router",), routing="sum"), tiny_moe,
         "--train router with sum routing: the router gets no gradient"),
        (dict(data=data, train=("lora",), balance=0.01), tiny_moe,
         "--balance needs router probabilities"),
        (dict(data=(data[0] + ".missing",)), tiny_checkpoint, "prose.txt.missing not found"),
        (dict(data=(tiny_checkpoint,)), tiny_checkpoint, "tiny0 is a directory: give a text file"),
    ]
    for spec, checkpoint, message in cases:
        with pytest.raises((ValueError, OSError), match=message):
            train.train(
                checkpoint, str(tmp_path / "out"), train.TrainSpec(**spec), log=lambda *_: None
            )
    for spec, message in [
        (dict(train=("lora", "wings")), "--train wings: not one of"),
        (dict(train=("lora", "all")), "--train lora with experts or all"),
        (dict(keep_function=True),
         "--keep-function rescales a sum-routed MoE for --routing softmax"),
        (dict(lr=-1), "--lr -1 must be positive"),
        (dict(warmup=-2), "--warmup -2 must be non-negative"),
        (dict(min_lr=1.0), r"--min-lr 1.0 must be in \[0, --lr 0.0002\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            train.TrainSpec(**spec)
    assert os.listdir(tmp_path) == []
    cli = subprocess.run([sys.executable, "train.py", tiny_checkpoint, "--out", str(tmp_path / "x"),
                          "--data", data[0], "--train", "lora,wings"], cwd=ROOT,
                         capture_output=True, text=True)
    assert cli.returncode == 1 and cli.stderr.strip().splitlines() == [
        "train.py: error: --train wings: not one of router, norms, lora, experts, all"]


def test_an_interrupted_save_leaves_no_partial_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(CheckpointWriter, "finish", broken)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_checkpoint, str(tmp_path / "out"), data_of(tiny_checkpoint), train=("lora",),
            steps=1)
    assert os.listdir(tmp_path) == []


# ---- defaults, dtypes and what a run may overwrite


def test_default_flags_heal_an_moe_and_adapt_a_dense_model(tiny_checkpoint, tiny_moe, tmp_path):
    data = data_of(tiny_checkpoint)
    for checkpoint, trainable, routing in ((tiny_moe, ("lora", "router"), "scaled"),
                                           (tiny_checkpoint, ("lora",), None)):
        cfg = modeling.load_config(checkpoint)[0]
        spec, chosen = train.with_defaults(train.TrainSpec(data=data), cfg)
        assert (spec.train, spec.routing) == (trainable, routing) and chosen.startswith("for a")
    lines = []
    run(tiny_moe, str(tmp_path / "healed"), data, steps=1, log=lines.append)
    assert "defaults for an MoE checkpoint: --train lora,router --routing scaled" in lines
    assert modeling.load_config(str(tmp_path / "healed"))[0].moe["routing"] == "scaled"
    # given flags are kept: the router of a sum-routed MoE learns only once it is told how
    spec, chosen = train.with_defaults(train.TrainSpec(data=data, train=("lora",)),
                                   modeling.load_config(tiny_moe)[0])
    assert (spec.train, spec.routing, chosen) == (("lora",), None, "")


def test_the_saved_weights_keep_the_checkpoints_dtype_and_config_says_so(tiny_checkpoint,
                                                                         tmp_path):
    source = str(tmp_path / "bf16")
    save_checkpoint(
        modeling.load_model(tiny_checkpoint),
        modeling.load_config(tiny_checkpoint)[1],
        source,
        copy_from=tiny_checkpoint,
        dtype=torch.bfloat16,
    )
    for save_dtype, expected in ((None, "bfloat16"), ("float32", "float32")):
        out = str(tmp_path / f"out-{expected}")
        run(source, out, data_of(tiny_checkpoint), train=("lora",), steps=1,
            save_dtype=save_dtype)
        assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == expected
        weights = all_tensors(out)
        assert {t.dtype for t in weights.values()} == {getattr(torch, expected)}


def test_out_may_not_be_or_touch_what_the_run_reads(tiny_checkpoint, tiny_moe, tmp_path):
    data = data_of(tiny_checkpoint)
    cases = [(tiny_moe, "is the checkpoint this run reads"),
             (os.path.join(tiny_moe, "sub"), "lies inside the checkpoint"),
             (os.path.dirname(tiny_moe), "holds the checkpoint"),
             (tiny_checkpoint, "is the checkpoint")]
    for out, message in cases:
        checkpoint = tiny_moe if out.startswith(tiny_moe) or out == os.path.dirname(tiny_moe) \
            else tiny_checkpoint
        with pytest.raises(ValueError, match=f"--out .* {message}"):
            run(checkpoint, out, data, train=("lora",))
    prose = tmp_path / "prose.txt"
    shutil.copy(data[0], prose)
    with pytest.raises(ValueError, match="--out .*prose.txt is the --data file this run reads"):
        run(tiny_moe, str(prose), (str(prose), data[1]), train=("lora",))
    # through another name for the same directory
    link = tmp_path / "link"
    link.symlink_to(tiny_moe)
    with pytest.raises(ValueError, match="is the checkpoint this run reads"):
        run(str(link), tiny_moe, data, train=("lora",))


def test_resume_refuses_another_base_and_accepts_another_name_for_the_same(tiny_checkpoint,
                                                                         tiny_moe, tmp_path,
                                                                         monkeypatch):
    data = data_of(tiny_checkpoint)
    base = tmp_path / "base"
    shutil.copytree(tiny_moe, base)
    out = str(tmp_path / "out")
    run(str(base), out, data, train=("lora",), steps=2)
    monkeypatch.chdir(tmp_path)  # relative names for the base and the data: the same files
    relative = [os.path.relpath(d.split(":")[0]) + (":code" if d.endswith(":code") else "")
                for d in data]
    run("base", out, relative, train=("lora",), steps=2, resume=True)
    model = modeling.load_model(str(base))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.add_(1e-3)  # as if trained and merged in place
    save_checkpoint(model, modeling.load_config(str(base))[1], str(base))  # its tokenizer stays
    with pytest.raises(ValueError, match="base is not the checkpoint .*out was trained from"):
        run(str(base), out, data, train=("lora",), steps=2, resume=True)


def test_a_full_disk_is_refused_up_front_or_keeps_the_last_saved_state(tiny_checkpoint, tiny_moe,
                                                                      tmp_path, monkeypatch):
    data, out = data_of(tiny_checkpoint), str(tmp_path / "out")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with pytest.raises(ValueError, match=r"--out .*out: saving the model and its training state "
                                         r"needs about 0.\d MiB and .* has 0.0 MiB free"):
        run(tiny_moe, out, data, train=("lora",))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    save, calls = save_safetensors, []

    def disk_full_at_the_second_save(tensors, file):
        calls.append(file)
        if len(calls) > 2:  # the model, then the training state, then the step-4 model
            raise OSError(28, "No space left on device")
        save(tensors, file)
    monkeypatch.setattr(ckpt, "save_safetensors", disk_full_at_the_second_save)
    monkeypatch.setattr(train, "save_safetensors", disk_full_at_the_second_save)
    with pytest.raises(OSError, match=r"No space left on device; .*out still holds the state saved "
                                      r"at step 2$"):
        run(tiny_moe, out, data, train=("lora",), steps=4, save_every=2)
    assert json.load(open(os.path.join(out, "train_state.json")))["step"] == 2
    assert [f for f in os.listdir(tmp_path) if f != "out"] == []
