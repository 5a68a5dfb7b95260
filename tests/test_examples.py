"""Every script in examples/ runs with --fast in a fresh process (as a user would run it); so do README snippets."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# extra arguments and what each example must leave behind under --out (relative glob patterns)
EXTRA = {
    "diffusers_unet.py": [],
    "diffusers_unet.py --prediction v_prediction": ["--prediction", "v_prediction"],
}
EXPECTED_FILES = {
    "digits.py": ["plots/curves.png", "plots/spectrum.png", "wandb/offline-run-*"],
    "toy2d.py": ["toy2d_N*.png"],
    "diffusers_unet.py": ["wandb/offline-run-*"],
    "conditional.py": ["conditional_metrics.png", "csv/version_0/metrics.csv"],
    "text_conditional.py": ["csv/version_0/metrics.csv"],
    "attribution.py": ["attribution.csv"],  # and exit 0 only when the duplicated images come first
    "flow_dit.py": ["N16/checkpoints/memwatch-clean.ckpt", "N1024/checkpoints/memwatch-clean.ckpt"],
    "plain_loop.py": ["wandb/offline-run-*", "clean/memwatch-clean.ckpt"],
}
# one torch thread: the example's own advice for a busy machine (the suite runs beside it)
ARGS = {
    name: ["--threads", "1"]
    for name in ("conditional.py", "attribution.py", "edm.py", "text_conditional.py", "flow_dit.py", "plain_loop.py")
}
ARGS["toy2d.py"] = ["--steps", "500"]  # the test reads that it runs and draws; README's numbers come from --fast
CASES = [(p, ARGS.get(p.name, [])) for p in EXAMPLES if p.name != "diffusers_unet.py"]
if (ROOT / "examples" / "diffusers_unet.py").exists():
    CASES += [(ROOT / "examples" / "diffusers_unet.py", extra) for extra in EXTRA.values()]
PARAMS = [pytest.param(p, e, id=" ".join([p.name, *e])) for p, e in CASES]


def _finite_checks(metrics_csv: Path, column: str = "memwatch/sharp_fraction_mean") -> int:
    """Rows of a CSVLogger's metrics.csv where the monitor logged a finite ``column``."""
    with metrics_csv.open(newline="") as f:
        return sum(1 for row in csv.DictReader(f) if row.get(column) and math.isfinite(float(row[column])))


@pytest.mark.parametrize("script, extra", PARAMS)
def test_example_runs_fast(script, extra, tmp_path):
    if script.name in ("diffusers_unet.py", "flow_dit.py", "plain_loop.py"):
        pytest.importorskip("diffusers")
    out = tmp_path / "out"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(script), "--fast", "--out", str(out), *extra],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for pattern in EXPECTED_FILES.get(script.name, []):
        assert list(out.glob(pattern)), f"{script.name} wrote no {pattern} under {out}"
    # the checks ran and measured something (a run that skipped every check would still exit 0)
    for metrics_csv in out.glob("csv/version_0/metrics.csv"):
        assert _finite_checks(metrics_csv) >= 1, f"{script.name}: no check logged a finite sharp fraction"
    if script.name == "diffusers_unet.py":
        prediction = extra[1] if extra else "epsilon"
        assert f"UNet2DModel, prediction={prediction!r}, probe shape (1, 16, 16)" in proc.stdout
    if script.name == "flow_dit.py":  # found with no glue: the DiT, read as a flow velocity, probed with no class
        assert "DiTTransformer2DModel, prediction='flow_prediction', schedule flow, null class label 1" in proc.stdout


def _readme_snippet(heading: str) -> str:
    """The first ```python block below ``heading`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{heading}\n")
    found = re.search(r"```python\n(.*?)```", text[start:], flags=re.DOTALL)
    assert found, f"no python block below {heading!r} in README.md"
    return found.group(1)


def test_the_readme_plain_loop_is_the_examples_memwatch_code_in_at_most_15_lines():
    code = [line.split("  #")[0].rstrip() for line in _readme_snippet("## Any training loop").splitlines()]
    lines = [line for line in code if line.strip() and line.strip() != "..."]
    example = (ROOT / "examples" / "plain_loop.py").read_text()
    marked = [line for line in example.splitlines() if line.rstrip().endswith("# memwatch")]
    assert all(line.strip() in example for line in lines), [line for line in lines if line.strip() not in example]
    loop = {"for step in range(steps):", "break"}  # the loop's own lines the snippet shows for context
    assert len([line for line in lines if line.strip() not in loop]) <= 15 and len(marked) + 1 <= 15


def test_readme_math_without_lightning_runs_as_written(tmp_path):
    code = _readme_snippet("### The math without Lightning")
    check = (
        "\nassert x_t.shape == (16, 2) and not torch.equal(x_t, traj.samples)"
        "\nassert res.sharp_fraction.shape == res.lid.shape == ratio.shape == (16,)"
        "\nassert res.eigenvalues.shape == (16, 2)"
        "\nassert bool(res.finite.all())"
        "\nprint('snippet ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "snippet ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_readme_lid_snippet_builds_the_monitor_it_describes():
    namespace: dict = {}
    exec(_readme_snippet("## The LID signal"), namespace)  # noqa: S102 - the README's own code
    monitor = namespace["monitor"]
    assert monitor.detector.monitor == "lid_memorized_fraction" and "lid" in monitor.signals
    assert (monitor.sharpness.lid.statistic, monitor.sharpness.lid.count_threshold) == ("count", 3.0)


def test_every_library_name_the_readme_uses_imports_from_memwatch_itself():
    """A class or function the README names in backticks that a memwatch module exports is also
    importable as ``memwatch.<name>`` (a user reads a name and writes ``from memwatch import ...``)."""
    import importlib
    import pkgutil

    import memwatch

    exported = {}
    for info in pkgutil.walk_packages(memwatch.__path__, "memwatch."):
        if not info.name.startswith("memwatch.apps"):
            for name in getattr(importlib.import_module(info.name), "__all__", []):
                exported.setdefault(name, info.name)
    named = set(re.findall(r"`([A-Za-z_]\w*)(?:\(|`|\.)", (ROOT / "README.md").read_text()))
    statistics = {"relative", "profile", "drawdown"}  # the LID statistics' names, not functions, in the README
    missing = {n: exported[n] for n in named - statistics if n in exported and not hasattr(memwatch, n)}
    assert not missing, f"named in the README but not importable from memwatch: {missing}"
    assert memwatch.isolated is memwatch.probes.isolated
