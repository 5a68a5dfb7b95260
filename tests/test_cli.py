"""The `memwatch` command line: `memwatch demo --fast` end to end, and `memwatch fit` configs."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from wandb_offline import history_values, media_files, read_history

from memwatch.apps import cli, demo

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# ------------------------------------------------------------------------------ demo
def test_demo_fast_end_to_end(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # W&B's own warnings print, as for a user
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    captured = capfd.readouterr()
    printed = " ".join(captured.out.split())  # rich wraps lines at the terminal width
    # issue 32, item 4: the demo shows nothing that does not apply to it (W&B's `anonymous` setting,
    # a diverging sampler while its models are still learning)
    assert "WARNING" not in captured.err and "anonymous" not in captured.err, captured.err
    # the one warning that applies to the fast demo: its models, 250 steps in at the first check, are
    # too little trained to tell whether the prediction type fits (the full demo checks at step 500)
    undecided = "cannot tell whether the network fits prediction='epsilon'"
    assert not [str(w.message) for w in caught if "memwatch" in str(w.message) and undecided not in str(w.message)]

    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert {"curves.png", "memorized.png", "spectrum.png"} <= plots
    assert {f"probes_digits-N{demo.FAST.n_small}.png", f"probes_digits-N{demo.FAST.n_large}.png"} <= plots
    assert all((out / "plots" / p).stat().st_size > 5_000 for p in plots)

    runs = sorted(p for p in (out / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(runs) == 2  # memorizing run first, then the generalizing one
    finals = []
    for run in runs:
        rows = read_history(run)
        sharp = history_values(rows, "memwatch/sharp_fraction_mean")
        assert len(sharp) == demo.FAST.steps // demo.FAST.check_every
        assert len(history_values(rows, "memwatch/nn_memorized_fraction")) == len(sharp)  # reference data given
        assert history_values(rows, "demo/spectrum")[0]["_type"] == "image-file"
        assert not history_values(rows, "demo/probes")  # probe images only with --log-media
        assert not history_values(rows, "memwatch/most_memorized")
        assert media_files(run, ".png")
        finals.append(sharp[-1])
    memorizing, generalizing = finals
    assert memorizing > generalizing

    assert "memwatch demo: digits" in printed
    assert f"digits-N{demo.FAST.n_small}" in printed and "wandb sync" in printed
    assert "sklearn's public" in printed


# ------------------------------------------------------------------------------ fit
@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    assert cli.main(["fit", "--config", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    # the monitor is its own group (`monitor:` / `--monitor.*`), added to the Trainer's callbacks
    assert printed["monitor"]["every_n_train_steps"] > 0 and "sigmas" in printed["monitor"]
    assert printed["trainer"]["logger"]["class_path"].endswith("WandbLogger")
    assert printed["trainer"]["logger"]["init_args"]["offline"] is True


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_configs_redraw_their_progress_bar_rarely(config):
    # issue 21: a bar redrawn at every step (RichProgressBar) made `memwatch fit` ~2x slower than a
    # script, Lightning's default (TQDM, every step) ~1.3x on toy2d; benchmarks/bench_cli_fit.py measures it
    callbacks = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    bars = [c for c in callbacks if c["class_path"].endswith("ProgressBar")]
    assert [c["class_path"].rsplit(".", 1)[-1] for c in bars] == ["TQDMProgressBar"]
    assert bars[0]["init_args"]["refresh_rate"] >= 20


def test_digits_config_fits_a_few_steps_as_shipped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", "--config", str(ROOT / "configs" / "digits.yaml"), "--trainer.max_steps", "30"]) == 0
    printed = capsys.readouterr().out
    assert "memwatch: no check ran" in printed and "wandb sync" in printed
    assert not (tmp_path / "memwatch").exists()


def test_digits_config_matches_the_demo():
    config = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    args, model = config["monitor"], config["model"]["init_args"]
    d = demo.DEFAULT
    # both decide with the library's defaults: the config sets no noise level, threshold or onset rule
    assert not {"sigmas", "onset"} & set(args) and set(args["sharpness"]) == {"k"}
    assert (args["every_n_train_steps"], args["num_probes"], args["sharpness"]["k"]) == (
        d.check_every,
        d.num_probes,
        d.k,
    )
    assert (model["hidden"], model["depth"], model["lr"]) == (d.hidden, d.depth, d.lr)
    assert config["trainer"]["max_steps"] == d.steps
    assert config["data"]["init_args"]["n_train"] == d.n_small


def test_toy2d_config_fits_a_few_steps_with_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "toy2d.yaml"),
            "--trainer.max_steps",
            "200",  # the config checks every 200 steps: one check
            "--data.init_args.steps_per_epoch",
            "50",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "memwatch: no memorization onset (last check, step 200" in printed
    assert "wandb sync" in printed
    runs = sorted(p for p in (tmp_path / "memwatch_out" / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(runs) == 1
    rows = read_history(runs[0])
    assert len(history_values(rows, "memwatch/sharp_fraction_mean")) == 1
    # `memwatch fit` handed the data module's training points to the monitor
    assert len(history_values(rows, "memwatch/nn_memorized_fraction")) == 1
    assert (tmp_path / "memwatch_out" / "config.yaml").exists()


def test_monitor_arguments_are_overridden_from_the_command_line(tmp_path, monkeypatch, capsys):
    # `--monitor.*` is the documented path (`--trainer.callbacks.init_args.*` cannot address a list item)
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"), "--trainer.max_steps", "100"]
    argv += ["--trainer.logger", "false"]
    argv += ["--monitor.every_n_train_steps", "50", "--monitor.num_probes", "8", "--monitor.probes.sampler_steps", "10"]
    argv += ["--monitor.reference_data", "batches", "--monitor.onset.on", "either"]  # a string among tensor types
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "memwatch: no memorization onset (last check, step 100" in out and "copies of training data " in out
    with pytest.raises(ValueError, match="`num_probes` must be a positive integer, got 0"):
        cli.main(["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"), "--monitor.num_probes", "0"])


# ------------------------------------------------------------------------------ entry points
def test_usage_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "memwatch demo" not in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err
    assert cli.main(["demo", "--help"]) == 0
    assert "--wandb-mode" in capsys.readouterr().out


def test_python_dash_m_memwatch(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "memwatch", "--help"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout and "fit" in proc.stdout
