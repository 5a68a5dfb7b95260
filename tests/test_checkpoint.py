"""The clean checkpoint through real ``Trainer.fit`` runs: faults, kills, contents, per-run locations."""

from __future__ import annotations

import errno
import fcntl
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import datamodule
from callback_setup import trainer as cpu_trainer
from checkpoint_setup import LoraUNetModule, SaveAt, TinyModule, fit, sha256
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from memwatch.checkpoint import (
    CLEAN_CHECKPOINT_NAME,
    SaveOutcome,
    check_dirpath,
    check_save_mode,
    default_dirpath,
    load_adapter_checkpoint,
    prepare_dirpath,
    remove_stale_temp_files,
    save_clean_checkpoint,
)
from memwatch.errors import MemwatchError

TESTS = Path(__file__).parent
REAL_SAVE = torch.save


def _temp_files(dirpath: Path) -> list[Path]:
    return sorted(dirpath.glob(f".{CLEAN_CHECKPOINT_NAME}.*.tmp"))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if str(w.message).startswith("memwatch:")]


def _finished(trainer: pl.Trainer, max_steps: int = 6) -> bool:
    return trainer.state.finished and trainer.global_step == max_steps


class _RecordDirpath(pl.Callback):
    """Resolves the clean-checkpoint directory at setup, as the monitor does."""

    def __init__(self, dirpath=None) -> None:
        self.dirpath = dirpath
        self.resolved: Path | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.resolved = prepare_dirpath(trainer, self.dirpath)


# ------------------------------------------------------------------------ faults never crash training
def test_full_disk_keeps_the_previous_checkpoint_and_training_continues(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):  # writes half, then the disk is full
        buffer = io.BytesIO()
        REAL_SAVE(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    dirpath = tmp_path / "clean"
    path = dirpath / CLEAN_CHECKPOINT_NAME
    kept = {}

    def before(step: int) -> None:
        if step == 6:  # after the failed save: the step-2 file, byte for byte, and no temporary file
            kept.update(digest=sha256(path), step=_load(path)["global_step"], temp=_temp_files(dirpath))
        monkeypatch.setattr(torch, "save", full_disk if step == 4 else REAL_SAVE)

    saver = SaveAt(dirpath, steps=[2, 4, 6], before=before)
    with pytest.warns(UserWarning, match="could not write the clean checkpoint") as record:
        trainer = fit(tmp_path, [saver])
    assert _finished(trainer)

    failed = saver.outcomes[4]
    assert not failed.ok and failed.path is None and failed.nbytes == 0 and failed.step == 4
    assert failed.error == "OSError: [Errno 28] No space left on device"
    [message] = _messages(record)
    assert f"dirpath={str(dirpath)!r}" in message
    assert "No space left on device" in message and "previous clean checkpoint (step 2) is kept" in message
    assert kept == dict(digest=saver.digests[2], step=2, temp=[])

    # the next good save replaces it
    assert saver.outcomes[2].ok and saver.outcomes[6].ok
    assert sha256(path) == saver.digests[6] != saver.digests[2]
    assert _load(path)["global_step"] == 6
    assert _temp_files(dirpath) == []


def test_a_file_as_dirpath_is_reported_not_raised(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    saver = SaveAt(afile, steps=[2, 4])
    with pytest.warns(UserWarning, match=f"dirpath={str(afile)!r}") as record:
        trainer = fit(tmp_path, [saver])
    assert _finished(trainer)
    assert [o.ok for o in saver.outcomes.values()] == [False, False]
    assert saver.outcomes[2].error.startswith(("FileExistsError", "NotADirectoryError"))
    assert all("there is no earlier clean checkpoint" in m for m in _messages(record))
    assert len(_messages(record)) == 2
    assert afile.read_text() == "not a directory"


def test_raise_errors_re_raises_the_original_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OSError):
        fit(tmp_path, [SaveAt(afile, steps=[2], raise_errors=True)])


# ------------------------------------------------------------------------ a kill during the save
def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_the_next_save_tidies(tmp_path):
    dirpath, marker, other_tmp = tmp_path / "clean", tmp_path / "marker", tmp_path / "other-tmpdir"
    other_tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(other_tmp))  # the save must not go through TMPDIR
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    script = TESTS / "checkpoint_kill_script.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(dirpath), str(marker)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300  # a hang guard only: no timing is asserted
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the script did not reach the second save: {proc.poll()=}"
        [orphan] = _temp_files(dirpath)  # killed half-way through writing it
        assert orphan.stat().st_size > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert list(other_tmp.iterdir()) == []

    path = dirpath / CLEAN_CHECKPOINT_NAME
    assert _load(path)["global_step"] == 2
    restored = TinyModule.load_from_checkpoint(path, map_location="cpu")
    assert isinstance(restored, TinyModule)
    assert _temp_files(dirpath) == [orphan]

    saver = SaveAt(dirpath, steps=[3])
    fit(tmp_path, [saver])
    assert saver.outcomes[3].ok
    assert _temp_files(dirpath) == []
    assert _load(path)["global_step"] == 3


def test_stale_temp_files_are_removed_but_a_live_writers_is_kept(tmp_path):
    stale = tmp_path / f".{CLEAN_CHECKPOINT_NAME}.dead.tmp"
    live = tmp_path / f".{CLEAN_CHECKPOINT_NAME}.live.tmp"
    unrelated = [tmp_path / ".other.ckpt.x.tmp", tmp_path / CLEAN_CHECKPOINT_NAME, tmp_path / "notes.tmp"]
    for path in [stale, live, *unrelated]:
        path.write_bytes(b"x")
    with open(live, "rb+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # another open file description: a live writer
        assert remove_stale_temp_files(tmp_path) == [stale]
    assert remove_stale_temp_files(tmp_path) == [live]
    assert all(path.exists() for path in unrelated)
    assert remove_stale_temp_files(tmp_path / "missing") == []


# ------------------------------------------------------------------------ what is saved
class _FirstStep(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.step = trainer.global_step


def test_weights_and_full_contents_and_what_they_restore(tmp_path):
    weights = SaveAt(tmp_path / "weights", steps=[3], mode="weights")
    full = SaveAt(tmp_path / "full", steps=[3], mode="full")
    fit(tmp_path, [weights, full])
    w, f = weights.outcomes[3], full.outcomes[3]
    assert w.ok and f.ok and w.mode == "weights" and f.mode == "full"
    assert w.nbytes == w.path.stat().st_size and f.nbytes == f.path.stat().st_size
    assert f.nbytes > w.nbytes

    wckpt, fckpt = _load(w.path), _load(f.path)
    for key in ("optimizer_states", "lr_schedulers", "callbacks"):
        assert key not in wckpt and key in fckpt
    assert wckpt["global_step"] == fckpt["global_step"] == 3
    assert {"exp_avg", "exp_avg_sq"} <= set(fckpt["optimizer_states"][0]["state"][0])
    assert any(k.startswith("ema.") for k in wckpt["state_dict"])  # an EMA submodule is model state

    restored = TinyModule.load_from_checkpoint(w.path, map_location="cpu")
    state = restored.state_dict()
    assert state.keys() == weights.states[3].keys()
    for name, value in weights.states[3].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)

    first = _FirstStep()  # full resumes training where it was saved; weights cannot
    trainer = cpu_trainer(tmp_path, [first], max_steps=6)
    trainer.fit(TinyModule(), ckpt_path=f.path)
    assert first.step == 3 and _finished(trainer)
    with pytest.raises(KeyError, match="optimizer"):
        cpu_trainer(tmp_path, [], max_steps=6).fit(TinyModule(), ckpt_path=w.path)


def test_adapter_mode_keeps_the_lora_weights_only_and_they_load_back_onto_the_base(tmp_path, capsys):
    from model_setups import digits_images

    pytest.importorskip("peft")
    adapter = SaveAt(tmp_path / "adapter", steps=[4], mode="adapter")
    weights = SaveAt(tmp_path / "weights", steps=[4], mode="weights")
    pl.seed_everything(0, verbose=False)
    module = LoraUNetModule()
    cpu_trainer(tmp_path, [adapter, weights], max_steps=4).fit(module, datamodule(digits_images(8), batch_size=8))
    a, w = adapter.outcomes[4], weights.outcomes[4]
    assert a.ok and a.mode == "adapter" and a.nbytes == a.path.stat().st_size
    with capsys.disabled():  # the sizes the README quotes
        print(f"\nLoRA UNet2DModel clean checkpoint: adapter {a.nbytes} bytes, weights {w.nbytes} bytes")
    assert 10 * a.nbytes < w.nbytes
    saved = torch.load(a.path, map_location="cpu", weights_only=True)  # tensors, text and numbers only
    assert saved["global_step"] == 4 and set(saved["memwatch_adapters"]) == {"unet"}
    lora = saved["memwatch_adapters"]["unet"]["default"]
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert '"r": 4' in saved["peft_configs"]["unet"]["default"]

    x, t = digits_images(4), torch.tensor([10, 30, 60, 90])
    fresh = LoraUNetModule()  # the same base weights and adapter config, the adapter untrained
    with torch.no_grad():
        trained, untrained = module.unet(x, t).sample, fresh.unet(x, t).sample
        assert not torch.allclose(trained, untrained, atol=1e-4)
        assert load_adapter_checkpoint(fresh, a.path) == ["unet:default"]
        torch.testing.assert_close(fresh.unet(x, t).sample, trained, rtol=0, atol=0)
    with pytest.raises(MemwatchError, match=r"holds adapter 'default' of the network at 'unet'.*no such adapted"):
        load_adapter_checkpoint(TinyModule(), a.path)
    with pytest.raises(MemwatchError, match='not a checkpoint of `checkpoint.mode`="adapter"'):
        load_adapter_checkpoint(fresh, w.path)


def test_adapter_mode_on_a_module_without_an_adapter_fails_at_fit_start(tmp_path):
    from diffusers import DDPMScheduler
    from model_setups import digits_images

    from memwatch import CheckpointOptions, MemorizationMonitor
    from memwatch.apps.toymodels import UNetDDPMModule, tiny_unet

    monitor = MemorizationMonitor(every_n_train_steps=2, checkpoint=CheckpointOptions(mode="adapter"))
    module = UNetDDPMModule(tiny_unet(), DDPMScheduler(num_train_timesteps=100))
    with pytest.raises(MemwatchError, match=r'`checkpoint.mode`="adapter" saves .*UNetDDPMModule has no peft-adapted'):
        cpu_trainer(tmp_path, [monitor], max_steps=2).fit(module, datamodule(digits_images(8), batch_size=8))


def test_bad_mode_raises_whatever_raise_errors(tmp_path):
    with pytest.raises(MemwatchError, match=r"`mode` must be one of \('weights', 'full', 'adapter'\), got 'optimizer'"):
        fit(tmp_path, [SaveAt(tmp_path, steps=[1], mode="optimizer")])
    assert check_save_mode("full") == "full"
    with pytest.raises(MemwatchError, match="`clean_checkpoint_mode` must be one of"):
        check_save_mode("all", name="clean_checkpoint_mode")


# ------------------------------------------------------------------------ where it goes
def test_check_dirpath_validates_without_creating(tmp_path):
    missing = tmp_path / "a" / "b"
    assert check_dirpath(missing) == missing and not (tmp_path / "a").exists()
    assert check_dirpath(tmp_path) == tmp_path and list(tmp_path.iterdir()) == []  # its write test is gone
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MemwatchError, match=rf"`dirpath`={str(afile)!r} must be a directory, but it is a file"):
        check_dirpath(afile)
    with pytest.raises(MemwatchError, match=r"`dirpath`=.*afile/sub.* is not a writable directory \(its parent"):
        check_dirpath(afile / "sub" / "deeper")
    with pytest.raises(MemwatchError, match="must be a local directory"):
        check_dirpath("s3://bucket/run")
    with pytest.raises(MemwatchError, match="`dirpath` must be a local directory path"):
        check_dirpath(3)


def test_check_dirpath_refuses_a_missing_folder_below_an_unwritable_one(tmp_path, monkeypatch):
    # permission bits do not stop root (who runs these tests in CI); os.access is what is asked
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(MemwatchError, match=r"nearest existing parent .* is not writable"):
        check_dirpath(tmp_path / "clean" / "run")


def test_prepare_dirpath_fails_setup_naming_dirpath(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(MemwatchError, match="`dirpath`=.*afile"):
        fit(tmp_path, [_RecordDirpath(afile)])


def test_prepare_dirpath_removes_stale_temp_files(tmp_path):
    dirpath = tmp_path / "clean"
    dirpath.mkdir()
    (dirpath / f".{CLEAN_CHECKPOINT_NAME}.dead.tmp").write_bytes(b"x")
    record = _RecordDirpath(dirpath)
    fit(tmp_path, [record], max_steps=1)
    assert record.resolved == dirpath and _temp_files(dirpath) == []


def _run_in_default_dir(root: Path, logger) -> tuple[Path, SaveOutcome]:
    record = _RecordDirpath()

    class _Save(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                self.outcome = save_clean_checkpoint(trainer, record.resolved)

    save = _Save()
    fit(root, [record, save], max_steps=2, logger=logger)
    assert save.outcome.ok and save.outcome.path.parent == record.resolved
    return record.resolved, save.outcome


def test_two_csv_runs_sharing_a_save_dir_get_their_own_checkpoint(tmp_path):
    first, a = _run_in_default_dir(tmp_path, CSVLogger(tmp_path / "logs"))
    second, b = _run_in_default_dir(tmp_path, CSVLogger(tmp_path / "logs"))
    assert first == tmp_path / "logs" / "lightning_logs" / "version_0" / "checkpoints" / "memwatch-clean"
    assert second == tmp_path / "logs" / "lightning_logs" / "version_1" / "checkpoints" / "memwatch-clean"
    assert a.path.exists() and b.path.exists()


def test_two_wandb_runs_sharing_a_save_dir_get_their_own_checkpoint(tmp_path):
    import wandb

    dirs = []
    for _ in range(2):
        logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="memwatch-test")
        dirpath, outcome = _run_in_default_dir(tmp_path, logger)
        assert dirpath == tmp_path / "memwatch-test" / logger.version / "checkpoints" / "memwatch-clean"
        dirs.append(dirpath)
        wandb.finish()
    assert dirs[0] != dirs[1]
    assert all((d / CLEAN_CHECKPOINT_NAME).exists() for d in dirs)


def test_two_runs_without_a_logger_get_their_own_checkpoint(tmp_path):
    first, _ = _run_in_default_dir(tmp_path, False)
    second, _ = _run_in_default_dir(tmp_path, False)
    assert first != second
    assert first.parent == second.parent == tmp_path / "checkpoints" / "memwatch-clean"


def test_default_dirpath_of_an_unversioned_logger(tmp_path):
    class _NoVersion(CSVLogger):
        @property
        def version(self):
            return None

    trainer = cpu_trainer(tmp_path, [], max_steps=6, logger=_NoVersion(tmp_path / "logs"))
    assert default_dirpath(trainer).parent == tmp_path / "checkpoints" / "memwatch-clean"


def test_a_fit_without_logger_creates_no_memwatch_folder_and_nothing_before_the_first_save(tmp_path, monkeypatch):
    """issue 21: ``./memwatch/`` in the working directory shadowed the editable install."""
    from callback_setup import datamodule, memorizing_data, module_2d

    from memwatch import MemorizationMonitor

    class _ListAtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.listing = sorted(p.name for p in tmp_path.iterdir())

    monkeypatch.chdir(tmp_path)
    monitor = MemorizationMonitor(
        every_n_train_steps=10, num_probes=4, sampler_steps=10, sigmas=(0.2,), k=2, verbose=False, raise_errors=True
    )
    start = _ListAtStart()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(  # no default_root_dir: the working directory, as for a newcomer's script
        max_steps=10,
        callbacks=[start, monitor],  # start looks before the monitor keeps the starting weights
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module_2d(hidden=16, depth=1), datamodule(memorizing_data()))
    assert start.listing == [], "nothing is created at setup"
    assert not (tmp_path / "memwatch").exists()
    assert monitor.clean_step == 10 and monitor.clean_checkpoint_path.exists()
    assert monitor.clean_checkpoint_path.parent.parent == tmp_path / "checkpoints" / "memwatch-clean"


def test_the_weights_training_starts_from_are_the_first_clean_checkpoint(tmp_path):
    """A fine-tune that memorizes before its first check can still go back: before any check the
    clean checkpoint holds the starting weights (step 0), and a resumed fit keeps its own."""
    from callback_setup import memorizing_data, module_2d

    from memwatch import MemorizationMonitor

    class _Before(pl.Callback):  # what is on disk at the step before the first check
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 4:
                self.step, self.path = monitor.clean_step, monitor.clean_checkpoint_path
                self.saved = _load(self.path)["state_dict"]

    pl.seed_everything(0, verbose=False)
    module = module_2d(hidden=16, depth=1)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    monitor = MemorizationMonitor(every_n_train_steps=5, num_probes=4, sampler_steps=10, sigmas=(0.2,), k=2,
                                  dirpath=tmp_path / "clean", verbose=False)  # fmt: skip
    before = _Before()
    cpu_trainer(tmp_path, [monitor, before], max_steps=5).fit(module, datamodule(memorizing_data()))
    assert before.step == 0 and before.path == tmp_path / "clean" / "memwatch-clean.ckpt"
    assert before.saved.keys() == start.keys()
    for name, value in start.items():
        torch.testing.assert_close(before.saved[name], value, rtol=0, atol=0)
    assert len(monitor.history) == 1 and monitor.clean_step in (0, 5)  # 5: the check was clean
