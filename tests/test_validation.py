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


@pytest.mark.timeout(120)
def test_fast_validation_writes_tables_and_plots(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--fast", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
    )
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
