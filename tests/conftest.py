"""Shared fixtures: quiet, offline, seeded, small."""

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")


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
