"""memwatch.reporting: the gallery says which images its training row shows (issue 21, item 6).

A :class:`CheckReporter` over a real :class:`MonitorLogger` (a CSV logger: the gallery is written
as a PNG) publishes one check of four probes; a recording subclass keeps each figure to read its
title, row labels and image data.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.nn import functional as F

from memwatch.errors import MemwatchError
from memwatch.loggers import MonitorLogger
from memwatch.onset import OnsetDecision
from memwatch.reporting import GALLERY_TEXT, CheckReporter, CheckResult
from memwatch.sharpness import SharpnessOptions, SharpnessResult
from memwatch.signals.alarm import AlarmReading

N, REF = 4, 6  # probes, reference items
LATENT = (4, 2, 2)  # a "latent" of 16 numbers: a 4×4 image at half the pixels' resolution


class RecordingLogger(MonitorLogger):
    """A MonitorLogger that also keeps each figure it logs."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.figures: dict[str, object] = {}

    def log_figure(self, name: str, figure: object, step: int, *, private: bool = False) -> None:
        self.figures[name] = figure
        super().log_figure(name, figure, step, private=private)


def _encode(images: torch.Tensor) -> torch.Tensor:
    """``[b, 1, 8, 8]`` pixels → ``[b, 4, 2, 2]`` latents (a 4×4 average pool, reshaped)."""
    return F.avg_pool2d(images, 2).reshape(-1, *LATENT)


def _decode(latents: torch.Tensor) -> torch.Tensor:
    """``[b, 4, 2, 2]`` latents → ``[b, 1, 8, 8]`` images (nearest upsampling of the 4×4 image)."""
    return latents.reshape(-1, 1, 4, 4).repeat_interleave(2, -1).repeat_interleave(2, -2)


def _check(samples: torch.Tensor, *, nearest: bool, nn_ratio: bool) -> CheckResult:
    unmeasured = SharpnessResult.unmeasured(torch.full((N,), 0.3), 16, SharpnessOptions(k=2), "dense")
    result = dataclasses.replace(unmeasured, memorization_score=torch.tensor([0.9, 0.1, 0.5, 0.3], dtype=torch.float64))
    return CheckResult(
        step=10,
        values={"onset": 0.0},
        results={50.0: result},
        samples=samples,
        nn_ratio=torch.tensor([0.1, 0.9, 0.4, 0.6]) if nn_ratio else None,
        decision=OnsetDecision(onset=False, memorizing=False, clean=True, reason=""),
        nearest=torch.tensor([5, 0, 2, 2]) if nearest else None,
    )


def _gallery(tmp_path, check: CheckResult, **publish: object):
    """Publish ``check``; returns the gallery figure and the PNG it was written to."""
    logger = RecordingLogger([CSVLogger(tmp_path, name="csv", version=0)], log_media=True)
    decode = publish.pop("decode_fn", None)
    reporter = CheckReporter(logger, threshold=0.5, log_figures=False, log_media=True, decode_fn=decode, verbose=False)
    reporter.publish(check, [check.values], onset_step=None, clean_checkpoint=None, **publish)
    (png,) = tmp_path.rglob("*most_memorized*.png")
    return logger.figures["most_memorized"], png


def _row_labels(fig) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]


@pytest.fixture()
def pixels() -> torch.Tensor:
    """``[REF, 1, 8, 8]`` the user's original reference images in [-1, 1]."""
    return torch.rand(REF, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_batches_gallery_says_no_training_sample_is_shown(tmp_path):
    probes = torch.rand(N, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fig, png = _gallery(tmp_path, _check(probes, nearest=False, nn_ratio=True))
    title = fig._suptitle.get_text().replace("\n", " ")
    assert "reference_data='batches' keeps them in memory only and never logs them" in title
    assert len(fig.axes) == N and _row_labels(fig) == ["probe"]  # no training row
    assert png.stat().st_size > 0


def test_gallery_without_reference_says_the_neighbours_are_unknown(tmp_path):
    probes = torch.zeros(N, 1, 8, 8)
    fig, _ = _gallery(tmp_path, _check(probes, nearest=False, nn_ratio=False))
    assert "no reference_data" in fig._suptitle.get_text().replace("\n", " ")
    assert len(fig.axes) == N


def test_latent_reference_is_labelled_as_decoded(tmp_path, pixels):
    latents = _encode(pixels)
    probes = torch.rand(N, *LATENT, generator=torch.Generator().manual_seed(2)) * 2 - 1
    check = _check(probes, nearest=True, nn_ratio=True)
    fig, _ = _gallery(tmp_path, check, reference=latents, decode_fn=_decode)
    assert _row_labels(fig) == ["generated\nprobe", GALLERY_TEXT["decoded"][1]]
    assert "decoded from the latent reference" in fig._suptitle.get_text().replace("\n", " ")
    # the first probe shown is the most memorized one (score 0.9, probe 0): its neighbour is reference item 5
    first_neighbour = fig.axes[1].images[0].get_array()
    assert np.allclose(first_neighbour, (_decode(latents[5:6])[0, 0].double().numpy() + 1) / 2)


def test_original_images_are_shown_instead_of_decoded_latents(tmp_path, pixels):
    latents = _encode(pixels)
    probes = torch.rand(N, *LATENT, generator=torch.Generator().manual_seed(2)) * 2 - 1
    check = _check(probes, nearest=True, nn_ratio=True)
    fig, png = _gallery(tmp_path, check, reference=latents, reference_images=pixels, decode_fn=_decode)
    assert _row_labels(fig) == ["generated\nprobe", GALLERY_TEXT["original"][1]]
    first_neighbour = fig.axes[1].images[0].get_array()
    assert np.allclose(first_neighbour, (pixels[5, 0].double().numpy() + 1) / 2)  # the original, not decoded
    assert not np.allclose(first_neighbour, (_decode(latents[5:6])[0, 0].double().numpy() + 1) / 2)
    assert png.stat().st_size > 0


def test_reference_images_must_match_the_reference(tmp_path, pixels):
    probes = torch.rand(N, *LATENT, generator=torch.Generator().manual_seed(2)) * 2 - 1
    check = _check(probes, nearest=True, nn_ratio=True)
    logger = MonitorLogger([CSVLogger(tmp_path)], log_media=True)
    reporter = CheckReporter(
        logger, threshold=0.5, log_figures=False, log_media=True, decode_fn=_decode, verbose=False, raise_errors=True
    )
    with pytest.raises(MemwatchError, match=r"`reference_images` must be \[N=6, C, H, W\] .* got shape \(5, 1, 8, 8\)"):
        reporter.publish(
            check, [], onset_step=None, clean_checkpoint=None, reference=_encode(pixels), reference_images=pixels[:5]
        )


def _onset_alert(tmp_path, values: dict[str, float], clean: str | None) -> str:
    """The onset alert a reporter sends for a check with ``values`` (``alarm_fraction`` decides)."""
    check = dataclasses.replace(
        _check(torch.zeros(N, 1, 4, 4), nearest=False, nn_ratio=True),
        values={"onset": 1.0, "alarm_fraction": 0.5, "nn_memorized_fraction": 0.5, **values},
        decision=OnsetDecision(True, True, False, "alarm_fraction=0.5 > 0.3 for 2 consecutive checks since step 10"),
        readings={"alarm": AlarmReading("copies (d₁/d₂ < 1/3)", None)},
    )
    logger = MonitorLogger([CSVLogger(tmp_path, name="csv", version=0)])
    reporter = CheckReporter(logger, threshold=0.5, log_figures=False, verbose=False, onset_key="alarm_fraction")
    with pytest.warns(UserWarning, match="memorization onset") as caught:
        reporter.publish(check, [check.values], onset_step=20, clean_checkpoint=clean)
    return str(caught[0].message)


def test_the_onset_alert_names_the_rule_and_the_clean_checkpoint(tmp_path):
    said = _onset_alert(tmp_path, {"clean_step": 5.0}, "ckpt/memwatch-clean.ckpt")
    assert "onset at step 10 by copies (d₁/d₂ < 1/3)" in said
    assert said.endswith("Last clean checkpoint: ckpt/memwatch-clean.ckpt (step 5)")


def test_an_onset_with_no_clean_check_before_it_says_so_and_what_would_have_caught_it(tmp_path):
    said = _onset_alert(tmp_path, {}, None)
    assert "no clean checkpoint: the model was memorizing by its first check (step 10)" in said
    assert "a smaller `cadence.first_check`" in said and "None (step None)" not in said
    said = _onset_alert(tmp_path, {"clean_step": 0.0}, "ckpt/memwatch-clean.ckpt")
    assert "Last clean checkpoint: ckpt/memwatch-clean.ckpt (step 0, the weights training started from): " in said
    assert "memorizing by its first check (step 10)" in said and "a smaller `cadence.first_check`" in said


# ------------------------------------------------------------------ the sampler the probes are drawn with
@pytest.mark.parametrize("clip", [True, False])
def test_a_fit_names_the_probes_sampler_in_its_config_and_result_line(tmp_path, caplog, clip):
    """The same weights give other probes with and without ``clip_sample`` (issue 32, item 6): a
    real fit of a diffusers-scheduled model puts the sampler's settings into the run's config
    (``hparams.yaml``) and names them in every result line."""
    import logging

    import lightning.pytorch as pl
    import yaml
    from callback_setup import datamodule, generalizing_data
    from diffusers import DDPMScheduler
    from model_setups import AnyDiffusion

    from memwatch import MemorizationMonitor, NoiseSchedule, ProbeOptions, SharpnessCheckOptions

    module = AnyDiffusion("diffusers", "epsilon")
    module.schedule = NoiseSchedule.from_diffusers(DDPMScheduler(num_train_timesteps=200, clip_sample=clip))
    monitor = MemorizationMonitor(
        every_n_train_steps=10, num_probes=4, sigmas=(0.3,), probes=ProbeOptions(sampler_steps=8),
        sharpness=SharpnessCheckOptions(k=2),
    )  # fmt: skip
    logger = CSVLogger(tmp_path)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=10, callbacks=[monitor], logger=logger, accelerator="cpu",
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):  # the suite quiets Lightning's logger
        trainer.fit(module, datamodule(generalizing_data()))  # no onset: the check prints its result line
    config = yaml.safe_load((Path(logger.log_dir) / "hparams.yaml").read_text())["memwatch/probe_sampler"]
    assert config["scheduler"] == "DDPMScheduler" and config["clip_sample"] is clip and config["steps"] == 8
    lines = [r.getMessage() for r in caplog.records if "sharp fraction" in r.getMessage()]
    clipping = "clip ±1" if clip else "no clipping"
    # one LID value: the one the default rule reads (and names, "isolated peaks (LID < …)"), the flat directions' count
    assert lines and all(line.count(", LID ") == 1 and "(flat directions; data " in line for line in lines), lines
    assert lines and all(f"probes: DDIM of the DDPMScheduler config, 8 steps, leading spacing, {clipping}" in line
                         for line in lines), lines  # fmt: skip


# ------------------------------------------------------------------ every phase under its own name
def test_every_phase_of_a_check_is_timed_and_shown_under_its_own_name(tmp_path, caplog, monkeypatch):
    """Issue 32, item 2: the first check's data LID (local PCA) was shown as part of "32 probes
    sampled". Each phase now has its own logged time (``memwatch/time/<phase>``) and console line,
    and the line's seconds are that phase's own."""
    import logging
    import math
    import re

    import lightning.pytorch as pl
    from callback_setup import datamodule, memorizing_data, module_2d

    import memwatch.reporting
    from memwatch import MemorizationMonitor, ProbeOptions, SharpnessCheckOptions

    monkeypatch.setattr(memwatch.reporting, "PROGRESS_AFTER_S", 0.0)  # every phase's line, however short
    monkeypatch.setattr(memwatch.reporting, "PROGRESS_MIN_S", 0.0)
    monitor = MemorizationMonitor(
        every_n_train_steps=10, num_probes=8, reference_data=memorizing_data(), probes=ProbeOptions(sampler_steps=8),
        sharpness=SharpnessCheckOptions(k=2),
    )  # fmt: skip
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=20, callbacks=[monitor], logger=CSVLogger(tmp_path),
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer.fit(module_2d(hidden=32, depth=1), datamodule(memorizing_data()))
    first, second = monitor.history
    phases = ("calibration", "data_lid", "sampling", "sharpness", "hessian_score_norm", "lid_passes", "copy_search",
              "lid", "decision", "publishing")  # fmt: skip
    for h in (first, second):
        assert all(h[f"time/{p}"] >= 0 for p in phases), h
        inside = sum(v for k, v in h.items() if k.startswith("time/") and k != "time/publishing")
        assert inside <= h["check_seconds"]  # disjoint phases: none counted twice
    assert first["time/data_lid"] > 0.0 and second["time/data_lid"] < first["time/data_lid"]  # fitted once
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memwatch step 10: ")]
    found = (re.fullmatch(r"memwatch step 10: (\w+)[^:]*: ([\d.]+)s(, peak memory .*)?", line) for line in lines)
    shown: dict[str, float] = {}
    for m in filter(None, found):  # a phase that runs twice (sharpness: measured, then summarized) sums its lines
        shown[m[1]] = shown.get(m[1], 0.0) + float(m[2])
    assert {"data_lid", "sampling"} <= set(shown), lines
    for phase, seconds in shown.items():  # each line shows its own phase's time, not the time since the check began
        assert math.isclose(seconds, first[f"time/{phase}"], abs_tol=0.11), (phase, seconds, first)
    metrics = (Path(trainer.logger.log_dir) / "metrics.csv").read_text()
    assert "memwatch/time/data_lid" in metrics and "memwatch/time/publishing" in metrics
