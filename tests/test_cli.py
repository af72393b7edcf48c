"""Bad input to the CLIs: one line naming the file, flag or value, before any slow work, and nothing
deleted that the program did not write, nothing left behind on an error, Ctrl-C or SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import convert as C
import weaver as W
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
    monkeypatch.setattr(C, "calibration_from_files", slow)
    monkeypatch.setattr(C, "calibration_from_model", slow)


def test_bad_convert_input_is_refused_before_calibration(tiny_checkpoint, tmp_path, no_slow_work):
    cases = [
        (dict(out="/proc/x/moe"), r"--out /proc/x/moe: cannot write in /proc"),
        (dict(spec=W.ConvertSpec(n_experts=8, dense_layers=(99,))), r"--dense-layers 99: the "
                                                                     "model has layers 0..1"),
        (dict(device="cuda"), r"--device cuda: this torch .* sees no CUDA GPU"),
        (dict(device="tpu:x"), r"--device 'tpu:x' is not a torch device"),
        (dict(data=tiny_data(tiny_checkpoint, calib=[os.path.join(tiny_checkpoint, "prose.txt")])),
         r"give --calib files of at least 2 tasks"),
        (dict(data=tiny_data(tiny_checkpoint, evals=["nope.txt"])), r"nope.txt not found"),
        (dict(max_shard_gb=0), r"--max-shard-gb 0 must be positive"),
        (dict(spec=W.ConvertSpec(n_experts=5)), r"not divisible by --experts 5"),
    ]
    for kw, message in cases:
        out = kw.pop("out", str(tmp_path / "moe"))
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            convert_main(tiny_checkpoint, out, **kw)
    for experts, message in ((0, "experts 0 must be at least 1"),
                             (-4, "experts -4 must be at least 1")):
        with pytest.raises(ValueError, match=message):
            W.ConvertSpec(n_experts=experts)
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
    convert_main(tiny_checkpoint, ours, W.ConvertSpec(n_experts=8, active=0.5))  # ours: replaced
    assert json.load(open(os.path.join(ours, "config.json")))["moe"]["active"] == 0.5
    assert os.stat(os.path.join(ours, "model.safetensors")).st_mtime_ns != first


def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, capsys):
    dead = tmp_path / ".tmp-out-99999999-abc_123"  # no such process
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".tmp-out-{os.getpid()}-xyz"  # a live process's: kept
    alive.mkdir()
    other = tmp_path / ".tmp-out-2-99999999-abc"  # another output's (named out-2): kept
    other.mkdir()
    with C.output_dir(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "x"), "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted([other.name, alive.name, "out"])
    assert "left by an interrupted earlier run" in capsys.readouterr().out


def test_sigterm_removes_the_temporary_directory(tmp_path):
    script = ("import sys, time; sys.path.insert(0, {root!r}); import convert as C; "
              "C.exit_on_sigterm()\nwith C.output_dir({out!r}) as tmp:\n"
              "    open(tmp + '/big', 'w').write('x' * 1000); print('ready', flush=True); "
              "time.sleep(60)\n")
    script = script.format(root=ROOT, out=str(tmp_path / "out"))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []


def test_the_clis_print_one_line(tiny_checkpoint, tmp_path):
    code, err = cli("convert.py", tiny_checkpoint, "--experts", "0", "--out", str(tmp_path / "x"))
    assert code == 1 and err == ["convert.py: error: experts 0 must be at least 1"]
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    os.remove(broken / "model.safetensors")
    code, err = cli("model.py", str(broken), "--max-new-tokens", "2")
    assert (
        code == 1
        and len(err) == 1
        and err[0].startswith("model.py: error: ")
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
