"""memwatch.apps.demo: settings from flags, one tiny run, what its report and figures hold."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from memwatch import defaults
from memwatch.apps import demo
from memwatch.options import ONSET_VALUES

TINY = dataclasses.replace(
    demo.FAST, n_small=8, n_large=64, steps=60, check_every=30, hidden=32, depth=1, num_probes=6, sampler_steps=8
)


def test_flags_reach_the_settings():
    parser = demo.add_arguments(argparse.ArgumentParser())
    settings = demo.settings_from_args(parser.parse_args(["--fast", "--n-small", "4", "--steps", "100"]))
    assert (settings.n_small, settings.n_large, settings.steps) == (4, demo.FAST.n_large, 100)
    assert settings.check_every <= settings.steps
    assert demo.settings_from_args(parser.parse_args([])) == demo.DEFAULT
    with pytest.raises(SystemExit, match="--n-small"):
        demo.settings_from_args(parser.parse_args(["--n-small", "1"]))


def test_bad_wandb_mode_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`wandb_mode` must be one of"):
        demo.fit_digits(8, TINY, out=tmp_path, wandb_mode="cloud")


def test_one_run_reports_what_the_monitor_saw(tmp_path):
    torch.set_num_threads(1)
    result = demo.fit_digits(8, TINY, out=tmp_path, wandb_mode="disabled", progress=False)
    assert result.steps == 60 and [h["step"] for h in result.history] == [30.0, 60.0]
    assert result.wandb_dir is None and result.early is not None
    # the report reads the monitor's own last check: same numbers, the library's rule
    assert result.late.score.shape == (TINY.num_probes,)
    assert result.onset_key == ONSET_VALUES[defaults.ONSET_ON]
    assert result.late.flagged.float().mean().item() == pytest.approx(result.final[result.onset_key])
    assert result.late.score.mean().item() == pytest.approx(result.final["sharp_fraction_mean"], abs=1e-6)
    assert (result.late.nn_ratio < 1 / 3).double().mean().item() == pytest.approx(result.final["nn_memorized_fraction"])
    assert result.late.samples.shape == (TINY.num_probes, 1, 8, 8)

    paths = demo.save_figures([result], TINY, tmp_path / "plots")
    assert set(paths) == {"curves", "memorized", "spectrum", "probes_digits-N8"}
    assert all(p.stat().st_size > 0 for p in paths.values())
    table = demo.summary_table([result])
    assert table.row_count == 1 and len(table.columns) == 8


def test_probe_images_reach_wandb_only_with_log_media(tmp_path):
    from wandb_offline import find_offline_run, history_values, read_history

    torch.set_num_threads(1)
    result = demo.fit_digits(8, TINY, out=tmp_path, wandb_mode="offline", log_media=True, progress=False)
    assert result.wandb_dir is not None and result.wandb_dir == find_offline_run(tmp_path)
    rows = read_history(result.wandb_dir)
    assert history_values(rows, "demo/probes")[0]["_type"] == "image-file"
    assert history_values(rows, "memwatch/most_memorized")  # the monitor's own gallery
    assert history_values(rows, "demo/spectrum")
