"""``benchmarks/validation.py --fast`` runs end to end and writes its report and figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "validation.py"
FIGURES = ("validation_auroc_vs_sigma.png", "validation_onset_vs_n.png", "validation_curves_gmm.png")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", *args],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.timeout(120)
def test_fast_validation_writes_tables_and_plots(tmp_path):
    proc = _run("--out", str(tmp_path), "--cache", str(tmp_path / "runs.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    report = (tmp_path / "validation.md").read_text()
    for heading in ("## 1. Per-probe detection", "## 2. Recommended defaults", "## 3. Onset", "## 4. Targets"):
        assert heading in report
    assert "| **sharp fraction** |" in report  # the per-signal AUROC table
    assert "| data | N | seed | NN truth onset | memwatch onset | lead |" in report
    # the offline replay of the onset rule agrees with the callback's own onset
    assert "reproduces the callback's own onset on 4/4 runs" in report
    for name in FIGURES:
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"img/{name}" in report


@pytest.mark.timeout(180)
def test_fresh_seeds_are_only_evaluated(tmp_path):
    assert _run("--seeds", "2").returncode == 2  # no selection seed and nowhere to save the runs
    proc = _run("--seeds", "2", "--cache", str(tmp_path / "fresh.pt"))
    assert proc.returncode == 0 and "saved 2 runs" in proc.stdout, proc.stderr[-3000:]
    proc = _run("--cache", str(tmp_path / "runs.pt"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(
        "--from-cache",
        str(tmp_path / "runs.pt"),
        "--fresh-cache",
        str(tmp_path / "fresh.pt"),
        "--out",
        str(tmp_path / "b"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "b" / "validation.md").read_text()
    assert "## 6. Fresh seeds (seeds 2)" in report and "equals the offline replay on 2/2 runs" in report
    # the fresh runs change nothing that was chosen: sections 1-5 are those of the report without them
    before = (tmp_path / "a" / "validation.md").read_text()
    assert report.split("## 6.")[0] == before.split("## Runtime")[0]
