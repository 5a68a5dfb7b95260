"""Run by test_callback.py: a 2-process CPU DDP fit (gloo) with the monitor; each rank writes a JSON report.

Lightning's "ddp" strategy re-launches this script for rank 1, so it must be a plain script.
``ddp_script.py OUT faults`` makes the check at step 200 raise on rank 1 only, and every
clean-checkpoint write fail on rank 0 (the rank that writes).
The plain run also compares the probes with the training samples each rank sees
(``reference_data="batches"``), reports how far that is from the ratio to the training set, and
logs the loss gap on held-out points (``heldout_data``).
"""

import errno
import json
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from callback_setup import datamodule, memorizing_data, module_2d

from memwatch import (
    CadenceOptions,
    CheckpointOptions,
    LossGapOptions,
    MemorizationMonitor,
    OnsetOptions,
    ProbeOptions,
    ReportOptions,
    SharpnessCheckOptions,
)
from memwatch.discovery import find_score
from memwatch.groundtruth import nn_ratio
from memwatch.probes import shard

warnings.filterwarnings("ignore")
warnings.filterwarnings("always", message="memwatch: the check", category=RuntimeWarning)
warnings.filterwarnings("always", message="memwatch: could not write")


def failing_on_rank1_at_step_200(module: pl.LightningModule):
    trainer = module.trainer
    if trainer.global_rank == 1 and trainer.global_step == 200:
        raise RuntimeError("injected failure")
    return find_score(module)


def disk_full_on_rank0() -> None:
    save = torch.save

    def full(*args, **kwargs):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(*args, **kwargs)

    torch.save = full


def main(out: Path, mode: str | None) -> None:
    pl.seed_everything(0, verbose=False)
    faults = mode == "faults"
    if faults:
        disk_full_on_rank0()
    monitor = MemorizationMonitor(
        score_fn=failing_on_rank1_at_step_200 if faults else None,
        # the budgeted cadence: the next check's step is rank zero's on both ranks (each times its own steps)
        every_n_train_steps=100 if faults else CadenceOptions(first_check=100, steps_per_sample=10, min_steps=50),
        num_probes=16,
        sigmas=(0.2,),
        stop_on_onset=True,
        reference_data="batches" if mode is None else None,
        probes=ProbeOptions(sampler_steps=20),
        sharpness=SharpnessCheckOptions(k=2),
        onset=OnsetOptions(patience=2),
        checkpoint=CheckpointOptions(dirpath=out / "clean"),
        report=ReportOptions(verbose=False, raise_errors=mode is None),  # the fault modes must warn, not raise
        # the loss gap, synced over ranks
        loss_gap=LossGapOptions(heldout_data=memorizing_data() * 0.5 if mode is None else None),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1500,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module_2d(), datamodule(memorizing_data(), batch_size=64))
    rows = shard(16, trainer.world_size, trainer.global_rank)
    report = {
        "world_size": trainer.world_size,
        "onset_step": monitor.onset_step,
        "global_step": trainer.global_step,
        # wall times are each rank's own
        "history": [
            {k: round(v, 9) for k, v in h.items() if k != "check_seconds" and not k.startswith("time/")}
            for h in monitor.history
        ],
        "local_probes": rows.stop - rows.start,
        "clean_step": monitor.clean_step,
    }
    if mode is None:  # this rank's probes: d1/d2 to the samples every rank saw vs to the training set
        check = monitor.last_check
        truth = nn_ratio(check.samples, memorizing_data()).float()
        report["batches_vs_truth"] = float((check.nn_ratio - truth).abs().max())
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    # shut gloo down before interpreter exit: left to exit, its threads can abort the process
    # ("terminate called without an active exception") and fail the run after it succeeded
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
