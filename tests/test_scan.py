"""memwatch scan: saved checkpoints give the live monitor's numbers, in step order, resumably."""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import memwatch
from memwatch.apps import cli
from memwatch.apps import scan as scan_app
from memwatch.apps.scan import check, scanning
from memwatch.apps.toymodels import DDPMModule, DigitsDataModule
from memwatch.callback import MemorizationMonitor
from memwatch.errors import MemwatchError
from memwatch.probes import isolated

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
    return {k: v for k, v in values.items() if k != "check_seconds" and not k.startswith("time/")}  # wall times


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

    monkeypatch.setattr(check._OfflineCheck, "measure", no_measuring)
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
    with pytest.raises(MemwatchError, match="pass `data.sample_shape`"):
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
        _, onset_step, _ = check._replay(monitor, copies_only)
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
    assert (
        "holds a 'UNet2DConditionModel'; scan loads UNet2DModel and DiTTransformer2DModel folders: a "
        "text-conditional network's unconditional probes need the empty prompt's embedding" in reasons["checkpoint-5"]
    )


def test_a_transformer_checkpoint_folder_with_a_flow_matching_scheduler_above_it_is_scanned(tmp_path):
    """``checkpoint-N/transformer/`` as the DiT / SD3 / Flux training scripts save it, the scheduler
    (flow matching) in ``output_dir/scheduler/``: the class from its config, its null condition the
    dropped label; a text-conditional transformer is skipped naming the prompt embedding it needs."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from model_setups import DiTDiffusion, PromptDiffusion

    from memwatch.data import digits

    output = tmp_path / "dit-flow"
    DiTDiffusion().transformer.save_pretrained(output / "checkpoint-100" / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=100).save_pretrained(output / "scheduler")
    result = scan_app.scan([output], data=digits(8), monitor_kwargs=dict(MONITOR, num_probes=4), progress=False)
    assert [c.step for c in result.checks] == [100] and not result.skipped
    assert result.checks[0].path == (output / "checkpoint-100").resolve()
    assert math.isfinite(result.checks[0].values["sharp_fraction_mean"])

    PromptDiffusion("sd3").transformer.save_pretrained(output / "checkpoint-200" / "transformer")
    with pytest.warns(UserWarning, match="skipped '.*checkpoint-200'"):
        again = scan_app.scan([output], data=digits(8), monitor_kwargs=dict(MONITOR, num_probes=4), progress=False)
    (skipped,) = again.skipped
    assert "holds a 'SD3Transformer2DModel'" in skipped.reason
    assert "need the empty prompt's embedding, which only its text encoder makes" in skipped.reason


class _PlainScore(torch.nn.Module):
    """A plain ``nn.Module`` (no ``.device``, no Trainer) with ``memwatch_score()``: an MLP ε-network."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def memwatch_score(self):
        def eps(x, t):
            return self.net(torch.cat([x, t[:, None].to(x.dtype) / 100], dim=1))

        return memwatch.DiffusionScore(eps, memwatch.NoiseSchedule.linear(100))


class _LightningScore(_PlainScore, pl.LightningModule):
    """The same network as a LightningModule."""


def test_the_offline_check_measures_a_plain_module_as_its_lightning_twin():
    """``offline_check`` takes the device from the module's parameters: a plain ``nn.Module`` gives
    the numbers the same network gives as a LightningModule."""
    kwargs = dict(num_probes=4, sampler_steps=5, k=2, sigmas=(0.3,), sample_shape=(2,), verbose=False)
    values = []
    for module in (_PlainScore(), _LightningScore()):
        monitor = MemorizationMonitor(**kwargs, save_clean_checkpoint=False)
        with isolated(module):
            monitor.prepare(module)
            values.append(_compared(monitor.offline_check(module).values))
    plain, lightning = values
    assert math.isfinite(plain["sharp_fraction_mean"])
    assert _same([plain], [lightning])


# ------------------------------------------------------------------------------ the command's failures
ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-probes", "2", "--sampler-steps", "5", "--k", "2", "--sigmas", "0.3", "--no-progress"]
INTERNAL_NAMES = ("sample_shape", "data_range", "reference_data", "module_class", "FileExistsError", "Traceback")


def _bad_files(folder: Path, good: Path) -> list[Path]:
    """An empty, a truncated and a text ``.ckpt`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "truncated.ckpt").write_bytes(good.read_bytes()[:2000])
    (folder / "notes.ckpt").write_text("not a checkpoint\n")
    return [folder / n for n in ("empty.ckpt", "truncated.ckpt", "notes.ckpt")]


def _one_error_line(err: str) -> str:
    """The stderr of a failed scan: one line, in the command's terms; returns it."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("memwatch scan: error: "), err
    assert not any(name in lines[0] for name in INTERNAL_NAMES), lines[0]
    return lines[0]


def test_a_real_scan_skips_bad_files_names_them_and_lists_them(trained, tmp_path):
    files, _, _ = trained
    folder = tmp_path / "ckpts"
    bad = _bad_files(folder, files[0])
    for step in (50, 100):
        shutil.copy(files[0].parent / f"step={step}.ckpt", folder)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "memwatch", "scan", str(folder), "--module", "memwatch.apps.toymodels.DDPMModule"]
    argv += ["--data", "8", "--out", str(out), *FAST]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("memwatch scan: warning: skipped")]
    assert len(warned) == 3 and all(any(str(b) in w for w in warned) for b in bad)
    assert any("the file is empty" in w for w in warned)
    assert sum("not a readable checkpoint" in w for w in warned) == 2
    assert "2 checkpoint(s), 2 measured now, 3 skipped: empty.ckpt, notes.ckpt, truncated.ckpt" in proc.stdout
    with (out / scan_app.SKIPPED_NAME).open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["checkpoint"]).name for r in rows) == sorted(b.name for b in bad)
    assert all(r["reason"] for r in rows)
    with (out / "scan.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [50, 100]


def test_every_checkpoint_unreadable_exits_1_with_one_error_line(trained, tmp_path, capsys):
    files, _, _ = trained
    _bad_files(tmp_path / "bad", files[0])
    out = tmp_path / "out"
    code = cli.main(
        ["scan", str(tmp_path / "bad"), "--module", "memwatch.apps.toymodels.DDPMModule", "--out", str(out)]
    )
    assert code == 1
    captured = capsys.readouterr()
    *warned, error = captured.err.strip().splitlines()
    assert len(warned) == 3 and all(w.startswith("memwatch scan: warning: skipped") for w in warned)
    assert _one_error_line(error) == (
        "memwatch scan: error: no checkpoint could be read: all 3 were skipped (see the warnings above)"
    )
    assert "0 checkpoint(s), 0 measured now, 3 skipped" in captured.out
    assert (out / scan_app.SKIPPED_NAME).exists() and not (out / "scan.csv").exists()


def _data_file(tmp_path: Path, data: torch.Tensor) -> str:
    path = tmp_path / "data.pt"
    torch.save(data, path)
    return str(path)


USAGE_ERRORS = {  # flags after the checkpoint folder → what the one line says; checked before any checkpoint
    "unknown flag": (lambda tmp: ["--bogus"], "unrecognized arguments: --bogus", True),
    "missing path": (lambda tmp: [str(tmp / "nowhere.ckpt")], "is neither a checkpoint file nor a folder", True),
    "--out names a file": (
        lambda tmp: ["--out", str(tmp / "taken.txt")],
        "`--out` must name a folder for the results, got the file",
        True,
    ),
    "--data no file": (lambda tmp: ["--data", str(tmp / "nope.pt")], "`--data` must be a number of digits", True),
    "--data not tensors": (lambda tmp: ["--data", str(tmp / "taken.txt")], "`--data` file", True),
    "--data all NaN": (
        lambda tmp: ["--data", _data_file(tmp, torch.full((8, 1, 8, 8), math.nan))],
        "`--data` must be finite: 8 of its 8 items hold NaN or Inf",
        True,
    ),
    "--data integers": (
        lambda tmp: ["--data", _data_file(tmp, torch.zeros(8, 1, 8, 8, dtype=torch.uint8))],
        "`--data` must be floating point",
        True,
    ),
    "--data one item": (
        lambda tmp: ["--data", _data_file(tmp, torch.zeros(1, 64))],
        "`--data` must hold at least 2 training items",
        True,
    ),
    "--num-probes 0": (lambda tmp: ["--data", "8", "--num-probes", "0"], "`--num-probes` must be a positive", True),
    "--scheduler no folder": (
        lambda tmp: ["--scheduler", str(tmp / "nowhere")],
        "`--scheduler` must be a folder with a scheduler_config.json",
        True,
    ),
    "--data of another shape": (
        lambda tmp: ["--data", _data_file(tmp, torch.randn(8, 3, 8, 8))],
        "fails on samples shaped like the `--data` items, (3, 8, 8) (RuntimeError: mat1 and mat2 shapes",
        False,
    ),
    "checkpoint of another class": (
        lambda tmp: ["--data", "8", "--module", "memwatch.apps.toymodels.UNetDDPMModule"],
        "does not load as memwatch.apps.toymodels.UNetDDPMModule (TypeError:",
        False,
    ),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_are_one_line_in_the_commands_flags_with_exit_code_2(case, trained, tmp_path, capsys, monkeypatch):
    files, _, _ = trained
    flags, expected, before_any_checkpoint = USAGE_ERRORS[case]
    (tmp_path / "taken.txt").write_text("a file\n")
    if before_any_checkpoint:  # a checkpoint read now fails the test: it would exit 1, not 2

        def no_reading(*args, **kwargs):
            raise AssertionError("a checkpoint was read before the arguments were checked")

        monkeypatch.setattr(scanning, "_global_step", no_reading)
    argv = ["scan", "--module", "memwatch.apps.toymodels.DDPMModule", "--out", str(tmp_path / "out"), *FAST]
    argv += [str(files[0].parent), *flags(tmp_path)]  # a later --out wins; a second path follows the first
    assert cli.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line


def test_debug_adds_the_traceback_and_keeps_the_exit_code(trained, tmp_path, capsys):
    files, _, _ = trained
    data = _data_file(tmp_path, torch.full((8, 1, 8, 8), math.nan))
    assert cli.main(["scan", str(files[0].parent), "--data", data, "--out", str(tmp_path / "out"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "MemwatchError" in err
    assert (
        err.strip().splitlines()[-1]
        == "memwatch scan: error: `--data` must be finite: 8 of its 8 items hold NaN or Inf"
    )


def test_an_unexpected_failure_is_one_line_with_exit_code_1(trained, tmp_path, capsys, monkeypatch):
    files, _, _ = trained

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line of the report")

    monkeypatch.setattr(check._OfflineCheck, "measure", broken)
    argv = ["scan", str(files[0]), "--module", "memwatch.apps.toymodels.DDPMModule", "--data", "8", *FAST]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == (
        "memwatch scan: error: RuntimeError: CUDA error: an illegal memory access (run with --debug for the traceback)"
    )


# ------------------------------------------------------------------------------ diffusers' training-script layout
def _diffusers_output(root: Path, steps: tuple[int, ...]) -> Path:
    """What diffusers' training scripts (``train_unconditional.py``) leave in ``output_dir``: the
    pipeline (``model_index.json``, ``unet/``, ``scheduler/``) and ``accelerator.save_state`` folders
    ``checkpoint-N/`` holding ``unet/``, ``unet_ema/`` and the optimizer's state."""
    from diffusers import DDPMScheduler

    from memwatch.apps.toymodels import tiny_unet

    torch.manual_seed(0)
    output = root / "ddpm-digits-8"  # a number in its name, as the scripts' own default ("ddpm-model-64")
    for step in steps:
        unet = tiny_unet()
        unet.save_pretrained(output / f"checkpoint-{step}" / "unet")
        unet.save_pretrained(output / f"checkpoint-{step}" / "unet_ema")
        (output / f"checkpoint-{step}" / "optimizer.bin").write_bytes(b"\0" * 16)
    tiny_unet().save_pretrained(output / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(output / "scheduler")
    (output / "model_index.json").write_text('{"_class_name": "DDPMPipeline"}')
    return output


def test_a_diffusers_output_folder_is_scanned_without_scheduler(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from memwatch.data import digits

    output = _diffusers_output(tmp_path, (10, 20, 30))
    (weights,) = (output / "checkpoint-30" / "unet").glob("diffusion_pytorch_model.*")
    weights.write_bytes(weights.read_bytes()[:100])  # an interrupted save: skipped, the others scanned
    assert cli.main(["scan", str(output), "--data", "8", "--out", str(tmp_path / "out"), *FAST]) == 0
    captured = capsys.readouterr()
    assert "2 checkpoint(s), 2 measured now, 1 skipped: checkpoint-30\n" in captured.out
    # (a logging handler of an earlier test in this worker may add noise to stderr: read the scan's lines only)
    (warned,) = [line for line in captured.err.splitlines() if line.startswith("memwatch scan: warning: skipped")]
    assert "checkpoint-30': it does not load (" in warned
    result = scan_app.scan(
        [output / "checkpoint-20"], data=digits(8), monitor_kwargs=dict(MONITOR, sigmas=(0.3,)), progress=False
    )  # named directly: the scheduler above it is found too
    assert [c.step for c in result.checks] == [20] and not result.skipped
    assert math.isfinite(result.checks[0].values["sharp_fraction_mean"])


def test_a_diffusers_checkpoint_without_any_scheduler_is_skipped_naming_the_flag(tmp_path, capsys):
    pytest.importorskip("diffusers")
    output = _diffusers_output(tmp_path, (10,))
    shutil.rmtree(output / "scheduler")
    assert cli.main(["scan", str(output), "--data", "8", "--out", str(tmp_path / "out"), *FAST]) == 1
    *warned, error = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 1 and "checkpoint-10': no scheduler/ folder in it or above it" in warned[0]
    assert "pass `--scheduler`" in warned[0]
    _one_error_line(error)
