"""One short real ``Trainer.fit`` per feature of MemorizationMonitor."""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import datamodule, fit, generalizing_data, memorizing_data, module_2d, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from wandb_offline import find_offline_run, history_values, media_files, read_history

import memwatch
from memwatch.apps.toymodels import DDPMModule, TensorDataModule
from memwatch.callback import MemorizationMonitor

FAST = dict(num_probes=8, sampler_steps=10, sigmas=(0.2,), k=2, verbose=False, raise_errors=True)


# ------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(every_n_train_steps=-5), "every_n_train_steps"),
        (dict(every_n_train_steps=None, every_n_epochs=None), "every_n_train_steps"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(num_probes=0), "num_probes"),
        (dict(k=0), "`k`"),
        (dict(method="arpack"), "`method`"),
        (dict(patience=0), "patience"),
        (dict(score_threshold=1.5), "score_threshold"),
        (dict(sigmas=()), "sigmas"),
        (dict(sampler_steps=1), "sampler_steps"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MemorizationMonitor(**kwargs)


def test_k_larger_than_the_dimension_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match="`sharpness.k`=3 is larger than the sample dimension d=2"):
        fit(tmp_path, memorizing_data(), MemorizationMonitor(every_n_train_steps=10, **dict(FAST, k=3)), max_steps=5)


def test_missing_score_fails_at_setup_with_what_to_add(tmp_path):
    class NoScore(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="memwatch_score"):
        fit(tmp_path, memorizing_data(), MemorizationMonitor(**FAST), module=NoScore(), max_steps=2)


# ------------------------------------------------------------------------ isolation
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path):
    data = generalizing_data()
    _, plain = fit(tmp_path / "a", data, None, max_steps=60)
    monitor = MemorizationMonitor(every_n_train_steps=20, save_clean_checkpoint=False, **FAST)
    _, watched = fit(tmp_path / "b", data, monitor, max_steps=60)
    assert len(monitor.history) == 3
    for (name, p), q in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(p, q), name
    assert watched.training and all(p.requires_grad for p in watched.parameters())


# ------------------------------------------------------------------------ loggers
def test_metrics_reach_csv_logger_and_callback_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = MemorizationMonitor(every_n_train_steps=25, **FAST)
    t, _ = fit(tmp_path, generalizing_data(), monitor, max_steps=50, logger=logger)  # no copies: clean checks
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [r for r in rows if r.get("memwatch/sharp_fraction_mean")]
    assert [int(r["step"]) for r in logged] == [25, 50]
    for name in ("lid_mean", "lambda_min", "normalized_eig_mean", "memorized_fraction", "onset"):
        assert logged[0][f"memwatch/{name}"] != ""
    assert "memwatch/sharp_fraction_mean" in t.callback_metrics
    assert list(Path(logger.log_dir, "memwatch").glob("spectrum_step*.png"))
    assert monitor.clean_checkpoint_path is not None and monitor.clean_checkpoint_path.exists()


def test_log_figures_false_keeps_scalars_and_drops_plots(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    monitor = MemorizationMonitor(every_n_train_steps=25, log_figures=False, **FAST)
    fit(tmp_path, memorizing_data(), monitor, max_steps=50, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert len([r for r in rows if r.get("memwatch/sharp_fraction_mean")]) == 2
    assert not list(Path(logger.log_dir).rglob("*.png"))


def test_on_check_end_sees_every_check_and_measure_probes_repeats_it(tmp_path):
    seen = []

    class Hooked(MemorizationMonitor):
        def on_check_end(self, trainer, pl_module, check):
            seen.append(check)

    monitor = Hooked(every_n_train_steps=10, **FAST)
    _, module = fit(tmp_path, memorizing_data(), monitor, max_steps=30)
    assert [c.step for c in seen] == [10, 20, 30] and monitor.last_check is seen[-1]
    last = seen[-1]
    assert last.values["sharp_fraction_mean"] == monitor.history[-1]["sharp_fraction_mean"]
    hs = last.hessian_score_norm  # Jeon et al.'s ‖H s‖ per probe, whose mean is logged
    assert hs is not None and hs.shape == (monitor.num_probes,) and bool(torch.isfinite(hs).all())
    assert hs.mean().item() == pytest.approx(monitor.history[-1]["hessian_score_norm_mean"], rel=1e-5)
    assert last.nn_ratio.shape == (8,) and bool(torch.isfinite(last.nn_ratio).all())  # the batches, by default
    assert last.samples.shape == (8, 2)
    ((t, result),) = last.results.items()
    assert result.sharp_fraction.shape == (8,)
    assert last.values["sharp_fraction_mean"] == pytest.approx(float(result.sharp_fraction.mean()))
    module.eval()  # measure_probes is what a check runs: same probes, same numbers for the same weights
    samples, again = monitor.measure_probes(module)
    torch.testing.assert_close(samples, last.samples)
    torch.testing.assert_close(again[t].eigenvalues, result.eigenvalues)


def test_wandb_offline_run_holds_metrics_histograms_images_and_table(tmp_path, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    images = torch.rand(64, 1, 4, 4) * 2 - 1
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="memwatch-test")
    monitor = MemorizationMonitor(every_n_train_steps=20, reference_data=images, log_media=True, **dict(FAST, k=4))
    module = DDPMModule(shape=(1, 4, 4), hidden=32, depth=1)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [monitor], max_steps=40, logger=logger).fit(module, TensorDataModule(images, batch_size=32))
    wandb.finish()
    run = find_offline_run(tmp_path)
    rows = read_history(run)
    for key in ("sharp_fraction_mean", "lid_mean", "memorized_fraction", "nn_memorized_fraction", "auroc", "onset"):
        assert len(history_values(rows, f"memwatch/{key}")) == 2, key
    assert history_values(rows, "memwatch/normalized_eigenvalues")[0]["_type"] == "histogram"
    assert history_values(rows, "memwatch/spectrum")[0]["_type"] == "image-file"
    assert history_values(rows, "memwatch/most_memorized")[0]["_type"] == "image-file"
    assert history_values(rows, "memwatch/probes")[0]["_type"] == "table-file"
    assert all("trainer/global_step" in r for r in rows if any(k.startswith("memwatch/") for k in r))
    assert len(media_files(run, ".png")) >= 4


def test_media_of_probes_are_off_by_default(tmp_path, monkeypatch):
    import wandb

    monkeypatch.chdir(tmp_path)
    images = torch.rand(64, 1, 4, 4) * 2 - 1
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="memwatch-test")
    monitor = MemorizationMonitor(every_n_train_steps=20, reference_data=images, **dict(FAST, k=4))
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [monitor], max_steps=20, logger=logger).fit(
        DDPMModule(shape=(1, 4, 4), hidden=32, depth=1), TensorDataModule(images, batch_size=32)
    )
    wandb.finish()
    rows = read_history(find_offline_run(tmp_path))
    assert history_values(rows, "memwatch/spectrum") and not history_values(rows, "memwatch/most_memorized")


# ------------------------------------------------------------------------ detection
def _detecting_monitor(**kwargs):
    """The sharpness rule: these tests follow the decision's machinery on memorized_fraction (the
    default rule on the same runs: tests/test_end_to_end.py)."""
    return MemorizationMonitor(
        onset=memwatch.OnsetOptions(on="sharpness", threshold=0.5, patience=2),
        every_n_train_steps=100,
        num_probes=16,
        sampler_steps=20,
        sigmas=(0.2,),
        k=2,
        stop_on_onset=True,
        verbose=False,
        raise_errors=True,
        **kwargs,
    )


def test_memorizing_run_stops_early_and_keeps_a_clean_checkpoint(tmp_path):
    monitor = _detecting_monitor(dirpath=tmp_path / "clean")
    t, _ = fit(tmp_path, memorizing_data(), monitor, max_steps=1500)
    assert monitor.onset_step is not None and t.global_step == monitor.onset_step < 1500
    assert monitor.clean_step is not None and monitor.clean_step < monitor.onset_step
    ckpt = torch.load(monitor.clean_checkpoint_path, weights_only=False)
    assert ckpt["global_step"] == monitor.clean_step
    assert t.callback_metrics["memwatch/onset"] == 1.0
    assert t.callback_metrics["memwatch/clean_step"] == monitor.clean_step


def test_generalizing_run_never_triggers(tmp_path):
    monitor = _detecting_monitor(save_clean_checkpoint=False)
    t, _ = fit(tmp_path, generalizing_data(), monitor, max_steps=1000)
    assert monitor.onset_step is None and t.global_step == 1000
    assert max(h["memorized_fraction"] for h in monitor.history) < 0.5


def test_resume_reaches_the_same_decision(tmp_path):
    """Interrupt right after the first exceeding check (streak 1 of patience 2): only a restored
    detector declares onset at the next check, as the uninterrupted run does."""

    def monitor():
        return _detecting_monitor(save_clean_checkpoint=False)

    full = monitor()
    fit(tmp_path / "full", memorizing_data(), full, max_steps=1500)
    first_exceeding = next(int(h["step"]) for h in full.history if h["memorized_fraction"] > 0.5)
    assert full.onset_step == first_exceeding + 100

    first = monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path / "a", [first, ckpt], max_steps=first_exceeding, enable_checkpointing=True).fit(
        module_2d(), datamodule(memorizing_data())
    )
    assert first.onset_step is None and first.detector.streak == 1

    resumed = monitor()
    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path / "b", [resumed], max_steps=1500)
    t.fit(module_2d(), datamodule(memorizing_data()), ckpt_path=ckpt.last_model_path)
    assert resumed.detector.state_dict()["history"][: len(first.history)] == first.detector.state_dict()["history"]
    assert resumed.onset_step == full.onset_step


# ------------------------------------------------------------------------ robustness
def test_nan_during_a_check_warns_and_training_continues(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, cond=None):
            out = self.net(x, t, cond)
            return out if self.training else out * float("nan")

    module = module_2d()
    module.net = Broken(module.net)
    monitor = MemorizationMonitor(every_n_train_steps=10, **dict(FAST, raise_errors=False))
    with pytest.warns(RuntimeWarning, match="not finite"):
        t, _ = fit(tmp_path, memorizing_data(), monitor, max_steps=30, module=module)
    assert t.global_step == 30 and len(monitor.history) == 3
    assert monitor.history[0]["nonfinite_count"] == 8


def test_every_n_epochs_cadence_and_explicit_score_fn(tmp_path):
    calls = []

    def score_fn(module):
        calls.append(1)
        return module.memwatch_score()

    monitor = MemorizationMonitor(score_fn=score_fn, every_n_train_steps=None, every_n_epochs=1, **FAST)
    fit(tmp_path, memorizing_data(), monitor, max_steps=200)  # 2 epochs of 100 steps
    assert [h["step"] for h in monitor.history] == [100.0, 200.0] and calls


def test_ema_copy_is_measured_when_asked(tmp_path):
    class WithEMA(type(module_2d())):
        def __init__(self):
            super().__init__(shape=(2,), hidden=32, depth=1)
            self.ema = torch.optim.swa_utils.AveragedModel(self.net)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.ema.update_parameters(self.net)

    monitor = MemorizationMonitor(every_n_train_steps=10, ema_attr="ema", **FAST)
    fit(tmp_path, memorizing_data(), monitor, max_steps=10, module=WithEMA())
    assert len(monitor.history) == 1
    with pytest.raises(ValueError, match="ema_attr"):
        fit(
            tmp_path,
            memorizing_data(),
            MemorizationMonitor(every_n_train_steps=10, ema_attr="nope", **FAST),
            max_steps=10,
        )


# ------------------------------------------------------------------------ DDP
def _ddp(tmp_path, *args):
    script = Path(__file__).with_name("ddp_script.py")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:  # a port of its own: DDP runs of parallel test workers must not meet
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_process_ddp_reaches_one_decision(tmp_path):
    _, ranks = _ddp(tmp_path)
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["onset_step"] == ranks[1]["onset_step"] is not None
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == ranks[0]["onset_step"]
    assert ranks[0]["history"] == ranks[1]["history"]  # synced metrics and one cadence, identical on both ranks
    steps = [int(h["step"]) for h in ranks[0]["history"]]
    assert steps[0] == 100 and all(h["cadence_steps"] >= 50 for h in ranks[0]["history"])  # the budget's, agreed
    assert ranks[0]["local_probes"] + ranks[1]["local_probes"] == 16
    # reference_data="batches": the ratio to the samples both ranks saw is the one to the training set
    assert "nn_memorized_fraction" in ranks[0]["history"][-1] and math.isfinite(ranks[0]["history"][-1]["loss_gap"])
    assert ranks[0]["batches_vs_truth"] < 1e-6 and ranks[1]["batches_vs_truth"] < 1e-6


def test_faults_on_one_rank_are_one_decision_for_both(tmp_path):
    """A check failing on rank 1 only (step 200) and every clean-checkpoint write failing on rank 0:
    one run, both faults (a DDP start costs ~15 s)."""
    proc, ranks = _ddp(tmp_path, "faults")
    # the failing check is skipped on both ranks
    assert "failed on rank 1 and was skipped" in proc.stderr and "injected failure" in proc.stderr
    steps = [[int(h["step"]) for h in r["history"]] for r in ranks]
    assert steps[0] == steps[1] and 100 in steps[0] and 200 not in steps[0] and 300 in steps[0]
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["global_step"] == ranks[1]["global_step"]
    # the clean checkpoint that rank 0 cannot write is one decision for both
    assert "could not write the clean checkpoint" in proc.stderr and "No space left" in proc.stderr
    assert ranks[0]["clean_step"] is None and ranks[1]["clean_step"] is None  # both ranks: the save failed
    assert ranks[0]["onset_step"] == ranks[1]["onset_step"] is not None  # training and monitoring went on


def test_a_failing_check_warns_and_training_continues(tmp_path):
    def failing_at_step_20(module):
        if module.trainer.global_step == 20:
            raise RuntimeError("injected failure")
        return module.memwatch_score()

    monitor = MemorizationMonitor(every_n_train_steps=10, score_fn=failing_at_step_20, **dict(FAST, raise_errors=False))
    with pytest.warns(RuntimeWarning, match=r"step 20 failed on rank 0 and was skipped: RuntimeError\('injected"):
        t, _ = fit(tmp_path, memorizing_data(), monitor, max_steps=30)
    assert t.global_step == 30 and [int(h["step"]) for h in monitor.history] == [10, 30]
    with pytest.raises(RuntimeError, match="injected failure"):
        fit(
            tmp_path,
            memorizing_data(),
            MemorizationMonitor(every_n_train_steps=10, score_fn=failing_at_step_20, **FAST),
        )


def test_public_api_exports_the_callback():
    assert memwatch.MemorizationMonitor is MemorizationMonitor
