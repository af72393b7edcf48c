"""train.py under FSDP2 (parallel.py): two gloo processes match one process with the same global
batch, a resumed sharded run equals an uninterrupted one, and two single-process "nodes" meeting
through a localhost c10d rendezvous match one process. LoRA, the routings, the balance loss, the
bias balancing and activation checkpointing all run sharded."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ROOT
from test_train import all_tensors, data_of, free_port, killed_after_step_2, run

# one process of a torchrun launch: train.train with these specs; stop=True stops the run right
# after its first save, as a killed run would
DRIVER = """
import sys
sys.path.insert(0, {root!r})
import train
save = train.save


def save_then_stop(*args, **kwargs):
    save(*args, **kwargs)
    raise SystemExit(3)


if {stop!r}:
    train.save = save_then_stop
if {mixed!r}:  # the GPU's policy, bf16 compute and fp32 reduction, here on the CPU
    wrap = train.wrap
    train.wrap = lambda *args, **kwargs: wrap(*args[:5], True, *args[6:], **kwargs)
train.train({checkpoint!r}, {out!r}, train.TrainSpec(**{spec!r}), train.RunSpec(**{run!r}))
"""

# one process takes the two processes' windows as two micro-batches, because the balance loss is
# not linear in the batch: each process (or micro-batch) forms its own, as in Switch
HEAL = dict(train=("lora", "router"), routing="softmax", balance=0.01, bias_balance=1e-3)
DOWNCYCLE = dict(train=("all",), routing="scaled", balance=0.01)


def torchrun(tmp_path, checkpoint, data, out, launcher, stop=False, batch=2, mixed=False,
             **options):
    spec = {k: v for k, v in options.items() if k in train.TrainSpec.__dataclass_fields__}
    spec = {"data": data, "seqlen": 16, "batch": batch, "steps": 4, "lr": 1e-2,
            "warmup": 1, **spec}
    run_spec = {"val_seqlen": 16, "val_windows": 2, "val_every": 2, "device": "cpu",
                **{k: v for k, v in options.items() if k not in spec}}
    driver = tmp_path / f"driver-{os.path.basename(out)}-{stop}.py"
    driver.write_text(DRIVER.format(root=ROOT, stop=stop, mixed=mixed, checkpoint=checkpoint,
                                    out=out, spec=spec, run=run_spec))
    command = [sys.executable, *(["-m", "torch.distributed.run", *launcher] if launcher else []),
               str(driver)]
    # the fault handler prints each thread's Python stack if a process aborts at exit
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    return subprocess.Popen(command, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process, ok=True) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert (process.returncode == 0) == ok, stderr[-3000:]
    return stdout


def two_processes():
    return ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port())]


def log(path):
    return [json.loads(line) for line in open(os.path.join(path, "train_log.jsonl"))]


def assert_same_training(one: str, other: str, exact: bool = False) -> None:
    """The saved model, training state and losses of two runs: equal, or within fp32 reduction
    order noise."""
    a, b = all_tensors(one), all_tensors(other)
    assert a.keys() == b.keys()
    state = lambda path: load_file(os.path.join(path, "train_state.safetensors"))
    a |= {f"state.{n}": t for n, t in state(one).items()}
    b |= {f"state.{n}": t for n, t in state(other).items()}
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            # Adam's step m / sqrt(v) is about lr (1e-2) in size however small the gradient, so
            # an element whose gradient is near zero can carry the summation order's noise into
            # its step at that scale: allow 1% of one step
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"{name}: {m}")
    losses = lambda path: [r["loss"] for r in log(path) if "loss" in r]
    assert len(losses(one)) == 4
    torch.testing.assert_close(torch.tensor(losses(one)), torch.tensor(losses(other)),
                               rtol=1e-5, atol=1e-6)


def test_fsdp_on_two_gloo_processes_matches_one_and_resumes_exactly(tiny_checkpoint, tiny_moe,
                                                                    tmp_path):
    """Healing: LoRA and the router, softmax, the balance loss, bias balancing, checkpointing."""
    data = data_of(tiny_checkpoint)
    one, two, broken = (str(tmp_path / name) for name in ("one", "two", "broken"))
    run(tiny_moe, one, data, batch=2, accum=2, checkpointing=True, **HEAL)
    sharded = dict(parallel="fsdp", checkpointing=True, **HEAL)
    output = finished(torchrun(tmp_path, tiny_moe, data, two, two_processes(), **sharded))
    assert "with FSDP on 2 processes" in output and "memory per process" in output
    assert_same_training(one, two)
    # killed after its step-2 save, then resumed: the uninterrupted sharded run exactly
    finished(torchrun(tmp_path, tiny_moe, data, broken, two_processes(), stop=True, save_every=2,
                      **sharded), ok=False)
    assert json.load(open(os.path.join(broken, "train_state.json")))["step"] == 2
    finished(torchrun(tmp_path, tiny_moe, data, broken, two_processes(), resume=True, **sharded))
    assert_same_training(two, broken, exact=True)


def test_two_nodes_meet_through_a_localhost_rendezvous_and_match_one(tiny_checkpoint, tiny_moe,
                                                                     tmp_path):
    """Downcycling: every parameter, scaled routing (its gamma), the balance loss."""
    data = data_of(tiny_checkpoint)
    one, nodes = str(tmp_path / "one"), str(tmp_path / "nodes")
    run(tiny_moe, one, data, batch=2, accum=2, **DOWNCYCLE)
    port = free_port()
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"]
    first, second = (torchrun(tmp_path, tiny_moe, data, nodes, launcher, parallel="fsdp",
                              **DOWNCYCLE)
                     for _ in range(2))
    outputs = finished(first) + finished(second)
    assert "with FSDP on 2 processes" in outputs
    assert_same_training(one, nodes)


def test_cpu_offload_is_refused_without_fsdp_on_a_gpu():
    with pytest.raises(ValueError, match="--cpu-offload moves FSDP2's shards off a GPU"):
        train.RunSpec(cpu_offload=True, device="cpu", parallel="fsdp")
    with pytest.raises(ValueError, match="--parallel 'zero' is not one of ddp, fsdp"):
        train.RunSpec(parallel="zero")



def test_a_run_saved_under_ddp_resumes_under_fsdp(tiny_checkpoint, tiny_moe, tmp_path,
                                                  monkeypatch):
    """The training state holds whole tensors, so a resume may switch how the model is spread."""
    data = data_of(tiny_checkpoint)
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    run(tiny_moe, straight, data, **HEAL)
    killed_after_step_2(monkeypatch, tiny_moe, broken, data, **HEAL)
    output = finished(torchrun(tmp_path, tiny_moe, data, broken, None, resume=True,
                               parallel="fsdp", **HEAL))  # one process, its own interpreter
    assert "with FSDP on 1 process" in output and "resuming at step 2" in output
    assert_same_training(straight, broken)  # FSDP2 sums gradients in another order


def test_bf16_compute_with_fp32_reduction_trains_as_fp32_does(tiny_checkpoint, tiny_moe, tmp_path):
    """FSDP2's mixed precision, which train.py uses on a GPU, run on the CPU: the fp32 run's
    losses within bf16's precision, and fp32 master weights kept."""
    data = data_of(tiny_checkpoint)
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    run(tiny_moe, fp32, data, **DOWNCYCLE)
    finished(torchrun(tmp_path, tiny_moe, data, bf16, None, mixed=True, parallel="fsdp",
                      **DOWNCYCLE))
    losses = lambda path: torch.tensor([r["loss"] for r in log(path) if "loss" in r])
    # the first step's loss is the same weights' in bf16; lr 1e-2 then moves them apart
    torch.testing.assert_close(losses(bf16)[0], losses(fp32)[0], rtol=1e-2, atol=0)
    torch.testing.assert_close(losses(bf16), losses(fp32), rtol=0.1, atol=0)
    assert not torch.equal(losses(bf16), losses(fp32))  # it did compute in bf16
    state = load_file(os.path.join(bf16, "train_state.safetensors"))  # the fp32 master weights
    assert all(t.dtype == torch.float32 for n, t in state.items() if n.startswith("param."))
