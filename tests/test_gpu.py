"""gpu.py, the prepared GPU command: its dry run (tiny shapes, CPU) runs every section and writes
the report, so the command cannot rot between the rare GPU sessions; MFU's parameter count."""
import json
import os
import subprocess
import sys

import gpu
import model as modeling
from conftest import ROOT


def test_the_dry_run_writes_every_section_and_says_what_it_skips(tmp_path):
    done = subprocess.run([sys.executable, "gpu.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MFU skipped: no peak FLOP rate for cpu" in done.stdout
    report = json.load(open(tmp_path / "report.json"))
    assert [r["model"] for r in report["convert"]] == ["tiny"]
    assert [r["batch"] for r in report["decode"]] == [1, 2]
    assert {(r["T"], r["path"]) for r in report["ffn"]} == {(1, "gather"), (16, "gather")}
    assert [r["model"] for r in report["train"]] == ["dense", "moe"]
    assert all(r["tok_s"] > 0 and r["mfu"] is None for r in report["train"])
    text = open(tmp_path / "report.md").read()
    for table in ("| conversion |", "| decode |", "| FFN shape |", "| training |"):
        assert table in text
    assert "FFN f = 0.5, T = 1:" in text


def test_mfu_counts_the_routed_experts_a_token_picks(tiny_checkpoint, tiny_moe):
    """tiny_moe runs half of each FFN's neurons per token, so a token multiplies by the dense
    model's weights less half of each FFN, plus the routers."""
    dense, moe = modeling.load_model(tiny_checkpoint), modeling.load_model(tiny_moe)
    embedding = 0 if dense.cfg.tie_embeddings else dense.embed_tokens.weight.numel()
    assert gpu.matmul_parameters(dense.cfg) == \
        sum(p.numel() for p in dense.parameters()) - embedding
    half_ffn = 3 * dense.cfg.dim * dense.cfg.ffn_dim // 2
    routers = sum(p.numel() for b in moe.layers for p in b.mlp.router.parameters())
    assert routers > 0
    assert gpu.matmul_parameters(moe.cfg) == \
        gpu.matmul_parameters(dense.cfg) - dense.cfg.n_layers * half_ffn + routers
