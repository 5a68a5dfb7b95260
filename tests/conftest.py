"""Shared fixtures: quiet, offline, seeded, small."""

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: each one computes on one thread (and so do the
    # examples, DDP and scan subprocesses it starts), or the workers' thread pools oversubscribe
    # the cores and every test runs several times slower
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*`torch.jit.script` is deprecated.*")
        warnings.filterwarnings("ignore", ".*GPU available but not used.*")
        yield
