"""Bad input to the CLIs: one line naming the file, flag or value, before any slow work, and nothing
deleted that the program did not write."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import convert
import weaver
from checkpoint import MARKER, save_checkpoint
from conftest import ROOT, convert_main, tiny_data


def cli(*args, cwd=ROOT):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stderr.strip().splitlines()


@pytest.fixture
def no_slow_work(monkeypatch):
    """Calibration is the first slow step: reaching it means a check came too late."""
    def slow(*args, **kwargs):
        raise AssertionError("reached calibration before refusing the input")
    monkeypatch.setattr(convert, "calibration_from_files", slow)
    monkeypatch.setattr(convert, "calibration_from_model", slow)


def test_bad_convert_input_is_refused_before_calibration(tiny_checkpoint, tmp_path, no_slow_work):
    cases = [
        (dict(out="/proc/x/moe"), r"--out /proc/x/moe: cannot write in /proc"),
        (dict(spec=weaver.ConvertSpec(n_experts=8, dense_layers=(99,))), r"--dense-layers 99: the "
                                                                     "model has layers 0..1"),
        (dict(device="cuda"), r"--device cuda: this torch .* sees no CUDA GPU"),
        (dict(device="tpu:x"), r"--device 'tpu:x' is not a torch device"),
        (dict(data=tiny_data(tiny_checkpoint, calib=[os.path.join(tiny_checkpoint, "prose.txt")]),
              spec=weaver.ConvertSpec(n_experts=8, allocation="cv")),
         r"give calibration text of at least 2 tasks"),
        (dict(data=tiny_data(tiny_checkpoint, evals=["nope.txt"])), r"nope.txt not found"),
        (dict(data=tiny_data(tiny_checkpoint, evals=[tiny_checkpoint])),
         r"tiny0 is a directory: give a text file"),
        (dict(max_shard_gb=0), r"--max-shard-gb 0 must be positive"),
        (dict(spec=weaver.ConvertSpec(n_experts=5)), r"not divisible by --experts 5"),
    ]
    for kw, message in cases:
        out = kw.pop("out", str(tmp_path / "moe"))
        with pytest.raises((ValueError, OSError), match=message):
            convert_main(tiny_checkpoint, out, **kw)
    for experts, message in ((0, "experts 0 must be at least 1"),
                             (-4, "experts -4 must be at least 1")):
        with pytest.raises(ValueError, match=message):
            weaver.ConvertSpec(n_experts=experts)
    for kw, message in ((dict(samples=0), "--calib-samples 0 must be at least 1"),
                        (dict(holdout=1.0), r"--holdout 1.0 must be in \[0, 1\)"),
                        (dict(holdout=0.0, evals=("x.txt",)), "--holdout must be above 0")):
        with pytest.raises(ValueError, match=message):
            tiny_data(tiny_checkpoint, **kw)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"broken/config.json: not valid JSON"):
        convert_main(str(broken), str(tmp_path / "moe"))
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_binary_calibration_file_is_named(tiny_checkpoint, tmp_path):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"weights.bin: not UTF-8 text"):
        convert_main(
            tiny_checkpoint,
            str(tmp_path / "moe"),
            data=tiny_data(tiny_checkpoint,
                           calib=[str(binary), os.path.join(tiny_checkpoint, "code.txt")]),
        )


def test_out_is_replaced_only_when_we_wrote_it(tiny_checkpoint, tmp_path):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "report.json").write_text("{}")  # looks like ours, but has no marker
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and was not written by expertweaver"):
        convert_main(tiny_checkpoint, str(foreign))
    assert sorted(os.listdir(foreign)) == ["notes.txt", "report.json"]
    ours = str(tmp_path / "ours")
    convert_main(tiny_checkpoint, ours)
    first = os.stat(os.path.join(ours, "model.safetensors")).st_mtime_ns
    convert_main(
        tiny_checkpoint, ours, weaver.ConvertSpec(n_experts=8, active=0.5)
    )  # ours: replaced
    assert json.load(open(os.path.join(ours, "config.json")))["moe"]["active"] == 0.5
    assert os.stat(os.path.join(ours, "model.safetensors")).st_mtime_ns != first


def test_out_may_not_be_or_touch_what_the_conversion_reads(tiny_checkpoint, tmp_path,
                                                            monkeypatch, no_slow_work):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXPERTWEAVER_CACHE", str(cache))
    (cache / "smollm2-135m").mkdir(parents=True)  # the demo, built: a directory of ours
    (cache / "smollm2-135m" / MARKER).write_text("ours")
    prose = os.path.join(tiny_checkpoint, "prose.txt")
    cases = [(tiny_checkpoint, "is the checkpoint this run reads"),
             (os.path.join(tiny_checkpoint, "moe"), "lies inside the checkpoint .*, which"),
             (str(cache / "smollm2-135m"), "lies inside the demo cache .*, which this run reads"),
             (str(cache), "is the demo cache this run reads")]
    for out, message in cases:
        with pytest.raises(ValueError, match=f"--out {out} {message}"):
            convert_main(tiny_checkpoint, out)
    ours = tmp_path / "ours"  # an earlier output of ours that now holds the calibration text
    ours.mkdir()
    (ours / MARKER).write_text("ours")
    shutil.copy(prose, ours / "prose.txt")
    data = tiny_data(tiny_checkpoint, calib=[str(ours / "prose.txt"),
                                             os.path.join(tiny_checkpoint, "code.txt")])
    with pytest.raises(ValueError, match=f"--out {ours} holds the --calib file .*prose.txt, "
                                         f"which this run reads"):
        convert_main(tiny_checkpoint, str(ours), data=data)
    assert sorted(os.listdir(ours)) == [MARKER, "prose.txt"]


def test_a_full_disk_is_refused_before_calibration(tiny_checkpoint, tmp_path, monkeypatch,
                                                   no_slow_work):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    for kw, what in ((dict(), "the conversion"), (dict(format="qwen2_moe"), "the conversion")):
        spec = weaver.ConvertSpec(n_experts=8, n_shared=4, router_bias=False)
        with pytest.raises(ValueError, match=f"--out .*moe: {what} needs about .* MiB and .* has "
                                             f"0.0 MiB free"):
            convert_main(tiny_checkpoint, str(tmp_path / "moe"), spec, **kw)


@pytest.mark.parametrize("fault, message", [
    ("truncate", r"model-00002-of-00002.safetensors: tensor '.*' ends \d+ bytes past the end of "
                 r"the file"),
    ("int32", r"model-00002-of-00002.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' is "
              r"I32 where a float"),
    ("shape", r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(47, 32\), config.json "
              r"implies \(48, 32\)"),
])
def test_every_shard_is_checked_before_calibration(tiny_checkpoint, tmp_path, no_slow_work, fault,
                                                   message):
    import model as modeling
    from safetensors.torch import load_file, save_file
    sharded = str(tmp_path / "sharded")
    model = modeling.load_model(tiny_checkpoint)
    save_checkpoint(
        model,
        modeling.load_config(tiny_checkpoint)[1],
        sharded,
        copy_from=tiny_checkpoint,
        max_shard_bytes=40_000,
    )
    last = os.path.join(sharded, "model-00002-of-00002.safetensors")
    if fault == "truncate":
        data = open(last, "rb").read()
        open(last, "wb").write(data[: len(data) - 100])
    else:
        tensors = load_file(last)
        name = "model.layers.1.mlp.up_proj.weight"
        tensors[name] = tensors[name].to(torch.int32) if fault == "int32" else tensors[name][:47]
        save_file(tensors, last)
    with pytest.raises(ValueError, match=message):
        convert_main(sharded, str(tmp_path / "moe"), data=tiny_data(tiny_checkpoint))


def test_the_clis_print_one_line(tiny_checkpoint, tmp_path):
    code, err = cli("convert.py", tiny_checkpoint, "--experts", "0", "--out", str(tmp_path / "x"))
    assert code == 1 and err == ["convert.py: error: experts 0 must be at least 1"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    os.remove(broken / "model.safetensors")
    code, err = cli("generate.py", str(broken), "--max-new-tokens", "2")
    assert (
        code == 1
        and len(err) == 1
        and err[0].startswith("generate.py: error: ")
        and "model.safetensors" in err[0]
    )
    start = time.time()
    code, err = cli(
        "convert.py",
        tiny_checkpoint,
        "--experts",
        "8",
        "--out",
        "/proc/x",
        "--calib",
        os.path.join(tiny_checkpoint, "prose.txt"),
        "--calib",
        os.path.join(tiny_checkpoint, "code.txt"),
    )
    assert code == 1 and err == [
        "convert.py: error: --out /proc/x: cannot write in /proc (No such file or directory)"
    ]
    assert time.time() - start < 60
