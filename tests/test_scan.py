"""memwatch scan: saved checkpoints give the live monitor's numbers, in step order, resumably."""

from __future__ import annotations

import csv
import math
import random

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from memwatch.apps import scan as scan_app
from memwatch.apps.toymodels import DDPMModule, DigitsDataModule
from memwatch.callback import MemorizationMonitor
from memwatch.errors import MemwatchError

MONITOR = {"every_n_train_steps": 50, "num_probes": 8, "sampler_steps": 10, "k": 2, "verbose": False}
STEPS = 200


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short digits run (N = 8) with the monitor and a checkpoint every 50 steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(n_train=8, batch_size=32, steps_per_epoch=STEPS)
    module = DDPMModule(shape=(1, 8, 8), hidden=32, depth=1, num_timesteps=1000, lr=2e-3)
    monitor = MemorizationMonitor(**MONITOR, reference_data=data.train_data, dirpath=root / "clean")
    ckpt = ModelCheckpoint(
        dirpath=root / "ckpt", every_n_train_steps=50, save_top_k=-1, save_weights_only=False, filename="{step}"
    )
    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[monitor, ckpt],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=data)
    files = sorted((root / "ckpt").glob("*.ckpt"))
    return files, monitor, data.train_data


def _same(a: list[dict[str, float]], b: list[dict[str, float]]) -> bool:
    """Equal histories, NaN equal to NaN."""
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (math.isnan(x[k]) and math.isnan(y[k])) for k in x)
        for x, y in zip(a, b)
    )


def _compared(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if k != "check_seconds"}


def test_scan_reproduces_the_live_checks_in_step_order_and_resumes(trained, tmp_path, monkeypatch):
    files, monitor, train_data = trained
    assert len(files) == 4 and len(monitor.history) == 4
    shuffled = files[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != files
    out = tmp_path / "scan"
    result = scan_app.scan(shuffled, DDPMModule, data=train_data, monitor_kwargs=MONITOR, out=out, progress=False)

    assert [c.step for c in result.checks] == [50, 100, 150, 200]
    assert [c.path.name for c in result.checks] == [f"step={s}.ckpt" for s in (50, 100, 150, 200)]
    assert result.measured == 4
    for live, scanned in zip(monitor.history, result.history):
        live, scanned = _compared(live), _compared(scanned)
        assert set(live) == set(scanned)
        for name, value in live.items():
            assert scanned[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    assert result.onset_step == monitor.onset_step
    for key in ("sharp_fraction_mean", "memorized_fraction", "nn_memorized_fraction", "auroc", "onset"):
        assert key in result.history[0]

    # the table holds the same numbers, the curves were drawn, each check has its attribution
    with (out / "scan.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [50, 100, 150, 200]
    assert float(rows[-1]["sharp_fraction_mean"]) == pytest.approx(monitor.history[-1]["sharp_fraction_mean"])
    assert (out / "curves.png").stat().st_size > 0
    last = result.checks[-1]
    assert sum(len(c.probes) for c in last.copied) == MONITOR["num_probes"]
    copies = sum(c.copies for c in last.copied)
    assert copies / MONITOR["num_probes"] == pytest.approx(last.values["nn_memorized_fraction"])
    assert (out / "attribution.csv").exists() and result.files["cache"] == out / scan_app.CACHE_NAME

    # a second scan measures nothing: every checkpoint comes from the cache
    def no_measuring(*args, **kwargs):
        raise AssertionError("a cached checkpoint was measured again")

    monkeypatch.setattr(scan_app._OfflineCheck, "measure", no_measuring)
    again = scan_app.scan(files, DDPMModule, data=train_data, monitor_kwargs=MONITOR, out=out, progress=False)
    assert again.measured == 0 and all(c.cached for c in again.checks)
    assert _same(again.history, result.history)
    assert [c.copied for c in again.checks] == [c.copied for c in result.checks]


def test_changed_settings_or_files_are_measured_again(trained, tmp_path):
    files, _, train_data = trained
    out = tmp_path / "scan"
    kwargs = dict(MONITOR, num_probes=2)
    first = scan_app.scan(files[:1], DDPMModule, data=train_data, monitor_kwargs=kwargs, out=out, progress=False)
    assert first.measured == 1
    other = scan_app.scan(
        files[:1], DDPMModule, data=train_data, monitor_kwargs=dict(kwargs, seed=1), out=out, progress=False
    )
    assert other.measured == 1
    assert other.checks[0].values["lambda_min"] != first.checks[0].values["lambda_min"]
    fresh = scan_app.scan(
        files[:1], DDPMModule, data=train_data, monitor_kwargs=kwargs, out=out, resume=False, progress=False
    )
    assert fresh.measured == 1 and _same([_compared(fresh.history[0])], [_compared(first.history[0])])


def test_command_line(trained, tmp_path, capsys):
    files, _, _ = trained
    out = tmp_path / "cli"
    code = scan_app.main(
        [str(files[0].parent), "--module", "memwatch.apps.toymodels.DDPMModule", "--data", "8", "--out", str(out)]
        + ["--num-probes", "2", "--sampler-steps", "10", "--k", "2", "--sigmas", "0.3", "--no-progress"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "4 checkpoint(s), 4 measured now" in text and "step 200" in text
    assert (out / "scan.csv").exists() and (out / "attribution.csv").exists()


def test_errors_name_what_is_wrong(trained, tmp_path):
    files, _, _ = trained
    with pytest.raises(MemwatchError, match="neither a checkpoint file nor a folder"):
        scan_app.scan([tmp_path / "missing.ckpt"], DDPMModule)
    with pytest.raises(MemwatchError, match="does not name its LightningModule class"):
        scan_app.scan(files[:1], monitor_kwargs=MONITOR, progress=False)
    with pytest.raises(MemwatchError, match="cannot import 'memwatch.apps.toymodels.Nope'"):
        scan_app.scan(files[:1], "memwatch.apps.toymodels.Nope", monitor_kwargs=MONITOR, progress=False)
    with pytest.raises(MemwatchError, match="`wandb_mode` must be one of"):
        scan_app.scan(files[:1], DDPMModule, wandb_mode="online")
    with pytest.raises(MemwatchError, match="pass `sample_shape=`"):
        scan_app.scan(files[:1], DDPMModule, monitor_kwargs=dict(MONITOR, sigmas=(0.3,)), progress=False)
    shaped = dict(MONITOR, sample_shape=(1, 8, 8))
    with pytest.raises(MemwatchError, match=r'sigmas="auto" \(the default\).*a scan sees no batches.*as `data`'):
        scan_app.scan(files[:1], DDPMModule, monitor_kwargs=shaped, progress=False)
    explicit = scan_app.scan(files[:1], DDPMModule, monitor_kwargs=dict(shaped, sigmas=(0.3,)), progress=False)
    assert math.isfinite(explicit.history[0]["sharp_fraction_mean"])


def test_the_replay_decides_on_the_share_onset_on_names_and_batches_need_data(trained, tmp_path):
    steps = (50, 100, 150, 200)
    copies_only = [  # copies but no sharp probe: only a replay on nn_memorized_fraction declares onset
        scan_app.CheckpointScan(tmp_path / f"{s}.ckpt", s, {"memorized_fraction": 0.0, "nn_memorized_fraction": v}, [])
        for s, v in zip(steps, (0.0, 0.5, 0.5, 0.5))
    ]
    reference = torch.zeros(2, 2)
    for onset_on, onset in (("copies", 150), ("sharpness", None)):
        monitor = MemorizationMonitor(**MONITOR, reference_data=reference, onset_on=onset_on)
        _, onset_step, _ = scan_app._replay(monitor, copies_only)
        assert onset_step == onset
    files, _, _ = trained
    with pytest.raises(MemwatchError, match="reference_data='batches' compares the probes with training batches"):
        scan_app.scan(files, DDPMModule, monitor_kwargs=dict(MONITOR, reference_data="batches"), progress=False)


def test_diffusers_folders_scan_like_the_live_monitor(tmp_path):
    """``save_pretrained`` folders as diffusers' training scripts keep them (``checkpoint-N/unet``):
    the network's class from its config, the scheduler beside it or given, the step from the name."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    from memwatch.apps.toymodels import UNetDDPMModule, tiny_unet
    from memwatch.data import digits

    class SavePretrained(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.global_step % 10 == 0:
                folder = tmp_path / "run" / f"checkpoint-{trainer.global_step}"
                module.unet.save_pretrained(folder / "unet")
                if trainer.global_step == 10:  # the later one has no scheduler of its own
                    module.scheduler.save_pretrained(folder / "scheduler")

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    images = digits(8)
    kwargs = dict(every_n_train_steps=10, num_probes=4, sampler_steps=5, k=2, verbose=False)
    monitor = MemorizationMonitor(**kwargs, reference_data=images, save_clean_checkpoint=False)
    module = UNetDDPMModule(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    trainer = pl.Trainer(
        max_steps=20, callbacks=[monitor, SavePretrained()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, DigitsDataModule(n_train=8, batch_size=8, steps_per_epoch=20))
    with pytest.warns(UserWarning, match="skipped '.*checkpoint-20': no scheduler/ folder in it or above it"):
        partial = scan_app.scan([tmp_path / "run"], data=images, monitor_kwargs=kwargs, progress=False)
    assert [c.step for c in partial.checks] == [10]
    (skipped,) = partial.skipped
    assert skipped.path.name == "checkpoint-20" and "pass `scheduler`" in skipped.reason
    with pytest.raises(MemwatchError, match="`scheduler` must be a folder with a scheduler_config.json"):
        scan_app.scan([tmp_path / "run"], monitor_kwargs=kwargs, progress=False, scheduler=tmp_path / "nowhere")
    result = scan_app.scan(
        [tmp_path / "run"], data=images, monitor_kwargs=kwargs, progress=False,
        scheduler=tmp_path / "run" / "checkpoint-10" / "scheduler",
    )  # fmt: skip
    assert [c.step for c in result.checks] == [10, 20]
    for live, scanned in zip(monitor.history, result.history):
        for name, value in _compared(live).items():
            assert scanned[name] == pytest.approx(value, abs=1e-6, nan_ok=True), name


def test_a_diffusers_folder_without_a_step_or_of_a_conditional_network_is_skipped(tmp_path):
    pytest.importorskip("diffusers")
    from memwatch.apps.toymodels import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "final")
    tiny_unet(conditional=True).save_pretrained(tmp_path / "checkpoint-5")
    with pytest.warns(UserWarning, match="skipped") as caught:
        result = scan_app.scan([tmp_path / "final", tmp_path / "checkpoint-5"], progress=False)
    assert not result.checks and len(caught) == 2
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert reasons["final"].startswith("the folder's name holds no step: name it after its global step")
    assert "holds a 'UNet2DConditionModel'; scan loads UNet2DModel folders" in reasons["checkpoint-5"]
