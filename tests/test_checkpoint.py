"""checkpoint.py: output directories appear whole or not at all; temporaries of killed runs are
removed, nothing else is; SIGTERM cleans up like Ctrl-C."""
import os
import shutil
import signal
import subprocess
import sys

from checkpoint import MARKER, check_out
from conftest import ROOT



def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, capsys):
    def temporary(name, marker=True):
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
        if marker:
            (path / MARKER).write_text("ours")
        return path
    temporary(".tmp-out-99999999-abc_1234")  # no such process: removed
    temporary(".tmp-run-2-99999999-x1y2z3w4")  # another output's, beside this one: removed too
    old = tmp_path / ".old-out-99999999-a1b2c3d4"  # a kill while replacing: the old output inside
    old.mkdir()
    shutil.copytree(temporary(".keep", marker=True), old / "out")
    shutil.rmtree(tmp_path / ".keep")
    alive = temporary(f".tmp-out-{os.getpid()}-xyz12345")  # a live process's: kept
    foreign = temporary(".tmp-out-99999999-abcdefgh", marker=False)  # not ours: kept
    check_out(str(tmp_path / "out"))  # at the start of a run, before any work
    assert sorted(os.listdir(tmp_path)) == sorted([alive.name, foreign.name])
    assert capsys.readouterr().out.count("left by an interrupted earlier run") == 3


def test_sigterm_removes_the_temporary_directory(tmp_path):
    script = ("import sys, time; sys.path.insert(0, {root!r}); from checkpoint import *; "
              "exit_on_sigterm()\nwith output_dir({out!r}) as tmp:\n"
              "    open(tmp + '/big', 'w').write('x' * 1000); print('ready', flush=True); "
              "time.sleep(60)\n")
    script = script.format(root=ROOT, out=str(tmp_path / "out"))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == []
