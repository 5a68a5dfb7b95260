"""Nothing a training batch holds can crash the run or skew a number (the batch intake, through
real fits): bucketed shapes, failing encoders, missing keys, uint8 images, label-first tuples,
NaN pixels, one distinct sample; and the decisions around it: resume after onset, a cadence that
never fires, a clean record that names only a file on disk, sampling retried on OOM."""

from __future__ import annotations

import math
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import CORNERS, fit, module_2d, trainer
from torch.utils.data import DataLoader

from memwatch import (
    CheckpointOptions,
    DataOptions,
    LossGapOptions,
    MemorizationMonitor,
    OnsetOptions,
    ProbeOptions,
    ProbeSet,
    ReportOptions,
    SharpnessCheckOptions,
    SharpnessOptions,
)
from memwatch.apps.toymodels import DDPMModule
from memwatch.errors import MemwatchError
from memwatch.probes import evaluation_timesteps
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore

QUICK = dict(
    num_probes=8,
    probes=ProbeOptions(sampler_steps=10),
    sharpness=SharpnessCheckOptions(k=2),
    report=ReportOptions(verbose=False),
)


class Batches(pl.LightningDataModule):
    """The given batches, in order, as the training data (any structure: dicts, tuples, uint8)."""

    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class Selecting(DDPMModule):
    """A DDPM whose training_step reads its samples with ``select`` (as a user's module would)."""

    def __init__(self, select, shape=(2,)) -> None:
        super().__init__(shape=shape, hidden=32, depth=1, lr=2e-3)
        self.select = select

    def training_step(self, batch, batch_idx):
        x = self.select(batch)
        return None if x is None else super().training_step(x.float() if x.dtype != torch.uint8 else x / 127.5 - 1, 0)


def _points(steps: int, n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pick = [torch.randint(0, 4, (n,), generator=g) for _ in range(steps)]
    return [CORNERS[i] + 0.1 * torch.randn(n, 2, generator=g) for i in pick]


def _fit(tmp_path, monitor, batches, module=None, **kwargs):
    """:func:`callback_setup.fit` on ``batches``, one step each, unseeded, a small MLP by default."""
    return fit(tmp_path, Batches(batches), monitor, len(batches), None, module, hidden=32, depth=1, **kwargs)[0]


def _finite(monitor, key="sharp_fraction_mean"):
    assert monitor.history, "no check ran"
    return all(math.isfinite(h[key]) for h in monitor.history)


@pytest.mark.parametrize("settings", [dict(), dict(sigmas=(0.2,), reference_data="batches")], ids=["auto", "batches"])
def test_bucketed_shapes_turn_the_intake_off_with_one_warning(tmp_path, settings):
    batches = _points(20)
    wide = [torch.cat([b, b], 1) for b in batches[5:]]  # a "bucket" of another shape from step 5 on
    module = Selecting(lambda b: b[:, :2])
    monitor = MemorizationMonitor(every_n_train_steps=10, **settings, **QUICK)
    with pytest.warns(UserWarning, match=r"step 5: its samples have shape \(4,\), the first batch's \(2,\)") as seen:
        _fit(tmp_path, monitor, batches[:5] + wide, module=module)
    assert sum("bucketed" in str(w.message) for w in seen) == 1
    assert len(monitor.history) == 2 and _finite(monitor)
    assert monitor.history[0]["intake_skipped_batches"] == 5  # the held samples of steps 0-4 are used


def test_an_encoder_that_fails_later_skips_those_batches_only(tmp_path):
    calls = {"n": 0}

    def encode(x):  # 1×2 "pixels" -> 2 latents; breaks from the 5th batch on in three ways
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("CUDA error: device-side assert")
        if calls["n"] == 6:
            return [x.flatten(1)]  # a list (e.g. a diffusers output object)
        if calls["n"] == 7:
            return x.flatten(1)[:, :1]  # another shape
        return x.flatten(1)

    batches = [b[:, None, :] for b in _points(10)]
    monitor = MemorizationMonitor(
        every_n_train_steps=10, data=DataOptions(sample_shape=(2,), encode_fn=encode), **QUICK
    )
    module = Selecting(lambda b: b[:, 0, :])
    with pytest.warns(UserWarning, match="data.encode_fn|CUDA error") as seen:
        _fit(tmp_path, monitor, batches, module=module)
    assert sum("Warned once" in str(w.message) for w in seen if "encode" in str(w.message)) == 1
    assert monitor.history and _finite(monitor) and monitor.history[-1]["intake_skipped_batches"] == 3


def test_a_dict_batch_without_the_key_is_skipped_once(tmp_path):
    batches = [{"image": b, "label": torch.zeros(len(b))} for b in _points(10)]
    batches[3] = {"label": torch.zeros(16)}  # the user's training_step skips it
    monitor = MemorizationMonitor(every_n_train_steps=10, data=DataOptions(select="image"), **QUICK)
    module = Selecting(lambda b: b.get("image"))
    with pytest.warns(UserWarning, match=r"`data.select`='image' is not a key of a tensor in the training batch"):
        _fit(tmp_path, monitor, batches, module=module)
    assert _finite(monitor) and monitor.history[-1]["intake_skipped_batches"] == 1


def _images(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    four = torch.randint(0, 256, (4, 1, 2, 2), generator=g, dtype=torch.uint8)
    return [four[torch.randint(0, 4, (16,), generator=g)] for _ in range(steps)]


def test_uint8_batches_are_refused_without_integer_range_and_match_floats_with_it(tmp_path):
    images = _images(20)
    common = dict(every_n_train_steps=10, reference_data="batches", **QUICK)
    module = Selecting(lambda b: b, shape=(1, 2, 2))
    refused = MemorizationMonitor(**common)
    with pytest.warns(UserWarning, match=r"uint8 samples .*set `data.integer_range`"):
        _fit(tmp_path / "refused", refused, images, module=module)
    assert refused.history == []  # nothing calibrated in raw units: the checks are skipped, loudly

    as_uint8 = MemorizationMonitor(**common, data=DataOptions(integer_range=(-1.0, 1.0)))
    _fit(tmp_path / "uint8", as_uint8, images, module=Selecting(lambda b: b, shape=(1, 2, 2)))
    as_float = MemorizationMonitor(**common)
    floats = [x / 255 * 2 - 1 for x in images]
    _fit(tmp_path / "float", as_float, floats, module=Selecting(lambda b: b, shape=(1, 2, 2)))
    assert as_uint8.calibrated_sigmas == pytest.approx(as_float.calibrated_sigmas)
    for a, b in zip(as_uint8.history, as_float.history):
        assert a["nn_memorized_fraction"] == b["nn_memorized_fraction"]


def test_label_first_tuples_are_read_with_a_tuple_index(tmp_path):
    batches = [(torch.zeros(16, 2), b) for b in _points(10)]  # (one-hot-ish label of the data's shape, x)
    monitor = MemorizationMonitor(every_n_train_steps=10, data=DataOptions(select=1), **QUICK)
    _fit(tmp_path, monitor, batches, module=Selecting(lambda b: b[1]))
    reference = MemorizationMonitor(every_n_train_steps=10, **QUICK)
    _fit(tmp_path / "plain", reference, [b for _, b in batches], module=Selecting(lambda b: b))
    assert monitor.calibrated_sigmas == pytest.approx(reference.calibrated_sigmas)  # the labels were not read


def test_nan_rows_are_dropped_counted_and_warned_once_with_the_step(tmp_path):
    batches = _points(20)
    batches[4] = batches[4].clone()
    batches[4][:3] = math.nan
    batches[12] = batches[12].clone()
    batches[12][0, 1] = math.inf
    module = Selecting(lambda b: torch.nan_to_num(b, nan=0.0, posinf=0.0))
    monitor = MemorizationMonitor(every_n_train_steps=10, reference_data="batches", **QUICK)
    with pytest.warns(UserWarning, match=r"3 of 16 samples of the training batch at step 4 hold NaN/Inf") as seen:
        _fit(tmp_path, monitor, batches, module=module)
    assert sum("hold NaN/Inf" in str(w.message) for w in seen) == 1
    assert [h["intake_dropped_rows"] for h in monitor.history] == [3, 4]
    assert _finite(monitor) and all(math.isfinite(h["nn_memorized_fraction"]) for h in monitor.history)


@pytest.mark.parametrize("where", ["heldout", "reference"])
def test_nan_in_user_data_fails_at_fit_start_naming_it(tmp_path, where):
    bad = CORNERS.clone()
    bad[1, 0] = math.nan
    if where == "heldout":
        monitor = MemorizationMonitor(reference_data="batches", loss_gap=LossGapOptions(heldout_data=bad), **QUICK)
        name = "loss_gap.heldout_data"
    else:
        monitor = MemorizationMonitor(reference_data=bad, **QUICK)
        name = "reference_data"
    with pytest.raises(MemwatchError, match=rf"`{name}` holds 1 of 4 samples with NaN/Inf"):
        _fit(tmp_path, monitor, _points(5))


def test_one_distinct_training_sample_keeps_the_sharpness_and_says_why_copies_are_nan(tmp_path):
    batches = [CORNERS[:1].repeat(16, 1) for _ in range(10)]
    monitor = MemorizationMonitor(every_n_train_steps=10, sigmas=(0.2,), reference_data="batches", **QUICK)
    with pytest.warns(UserWarning, match="fewer than two distinct training samples"):
        _fit(tmp_path, monitor, batches)
    last = monitor.history[-1]
    assert last["nonfinite_count"] == 0 and math.isfinite(last["sharp_fraction_mean"])
    assert math.isnan(last["nn_memorized_fraction"])


def _copying_score(module):
    """A denoiser that returns the nearest training point: every probe is a copy (d₁/d₂ = 0)."""
    nearest = lambda x, t: CORNERS.to(x)[torch.cdist(x, CORNERS.to(x)).argmin(1)]  # noqa: E731
    return DiffusionScore(nearest, NoiseSchedule.linear(1000), prediction="sample")


def test_a_resume_after_onset_honours_stop_on_onset(tmp_path):
    batches = _points(60)
    settings = dict(every_n_train_steps=10, sigmas=(0.2,), stop_on_onset=True, reference_data=CORNERS, **QUICK)
    onset = OnsetOptions(on="copies", threshold=0.5, patience=1)
    build = lambda: MemorizationMonitor(  # noqa: E731
        score_fn=_copying_score, onset=onset, checkpoint=CheckpointOptions(save=False), **settings
    )
    first = build()
    t = trainer(tmp_path, [first], max_steps=60)
    t.fit(module_2d(hidden=32, depth=1), Batches(batches))
    assert first.onset_step == 10 and t.global_step == 10  # stopped at onset
    ckpt = tmp_path / "after-onset.ckpt"
    t.save_checkpoint(ckpt)
    resumed = build()
    t2 = trainer(tmp_path / "resumed", [resumed], max_steps=60)
    t2.fit(module_2d(hidden=32, depth=1), Batches(batches), ckpt_path=ckpt)
    assert resumed.onset_step == 10 and t2.global_step == 20  # the first check after the resume stops it


def test_a_cadence_beyond_max_steps_says_so_at_fit_start(tmp_path):
    monitor = MemorizationMonitor(every_n_train_steps=100, **QUICK)
    with pytest.warns(UserWarning, match=r"no check will run: every_n_train_steps=100 is beyond .*max_steps=5"):
        _fit(tmp_path, monitor, _points(5))


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_the_clean_record_names_only_a_checkpoint_on_disk(tmp_path, monkeypatch, fault):
    import memwatch.keepers as keepers

    monitor = MemorizationMonitor(every_n_train_steps=10, sigmas=(0.2,), **{**QUICK, "report": ReportOptions(
        verbose=False, raise_errors=True)})  # fmt: skip
    real, calls = keepers.save_clean_checkpoint, {"n": 0}

    def save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the starting weights, step 10, then the fault at step 20
            raise fault("disk vanished")
        return real(*args, **kwargs)

    monkeypatch.setattr(keepers, "save_clean_checkpoint", save)
    with pytest.raises((fault, SystemExit)):  # Lightning turns a KeyboardInterrupt into SystemExit(1)
        _fit(tmp_path, monitor, _points(30))
    assert monitor.clean_step == 10 and monitor.clean_checkpoint_path.exists()
    assert torch.load(monitor.clean_checkpoint_path, weights_only=False)["global_step"] == 10


def test_sampling_is_retried_with_half_the_rows_on_out_of_memory():
    score = DiffusionScore(lambda x, t: 0.1 * x, NoiseSchedule.linear(100))
    seen: list[int | None] = []

    def tight_sampler(score, *, noise, steps, cond, states_at, device, max_batch):
        from memwatch.sampling import sample_trajectory

        seen.append(max_batch)
        if max_batch is None or max_batch > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sample_trajectory(score, noise=noise, steps=steps, cond=cond, states_at=states_at, device=device,
                                 max_batch=max_batch)  # fmt: skip

    timesteps = evaluation_timesteps(score.schedule, (0.3,))
    probes = ProbeSet((2,), num_probes=8, sampler_steps=5, timesteps=timesteps, sampler=tight_sampler)
    with pytest.warns(RuntimeWarning, match="out of memory while sampling the probes, retrying with max_batch=4"):
        m = probes.measure(score, options=SharpnessOptions(k=2))
    assert seen == [8, 4, 2] and torch.isfinite(m.primary.sharp_fraction).all()


def test_a_clean_fit_with_the_defaults_warns_about_nothing_in_the_intake(tmp_path):
    monitor = MemorizationMonitor(every_n_train_steps=10, reference_data="batches", **QUICK)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, monitor, _points(20))
    assert not [w for w in seen if "training batch" in str(w.message)]
    assert [h["intake_skipped_batches"] for h in monitor.history] == [0, 0] and _finite(monitor)


@pytest.mark.parametrize(
    ("ids", "said"),
    [
        ("idx", r"`data.ids`='idx' must give 16 integer \(or string\) ids of the batch's items, got NoneType"),
        ("pos", r"`data.ids`='pos' must give 16 integer \(or string\) ids of the batch's items, got a torch.float32"),
    ],
)
def test_item_ids_the_batches_do_not_hold_skip_the_batch_with_one_warning(tmp_path, ids, said):
    """``data.ids`` pointing at nothing, or at float "ids": every batch is skipped for the copy index, one
    warning names the setting, training goes on and the checks still run (their copies NaN: nothing held)."""
    batches = [{"x": b, "pos": b[:, 0]} for b in _points(20)]  # no "idx"; "pos" holds floats
    module = Selecting(lambda b: b["x"])
    monitor = MemorizationMonitor(every_n_train_steps=10, sigmas=(0.2,), data=DataOptions(select="x", ids=ids), **QUICK)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _fit(tmp_path, monitor, batches, module=module)
    told = [str(w.message) for w in seen if "data.ids" in str(w.message)]
    assert len(told) == 1 and re.search(said, told[0]), told
    assert len(monitor.history) == 2 and _finite(monitor) and monitor.history[-1]["intake_skipped_batches"] == 20
    assert len(monitor.signals["copies"].index) == 0 and math.isnan(monitor.history[-1]["nn_memorized_fraction"])


def test_string_item_ids_name_one_item_on_every_process():
    """Ids as a list of strings (a Hugging Face dataset's ``"id"`` column): the same name, the same id."""
    from memwatch.intake import item_ids

    a = item_ids({"id": ["cat-1", "dog-7", "cat-1"]}, "id", 3)
    assert a.dtype == torch.int64 and a[0] == a[2] and a[0] != a[1]
    assert torch.equal(a, item_ids({"id": ["cat-1", "dog-7", "cat-1"]}, "id", 3))
