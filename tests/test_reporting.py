"""memwatch.reporting: the gallery says which images its training row shows (issue 21, item 6).

A :class:`CheckReporter` over a real :class:`MonitorLogger` (a CSV logger: the gallery is written
as a PNG) publishes one check of four probes; a recording subclass keeps each figure to read its
title, row labels and image data.
"""

from __future__ import annotations

import dataclasses

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
        rule="copies (d₁/d₂ < 1/3)",
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
    assert "a smaller `every_n_train_steps`" in said and "None (step None)" not in said
