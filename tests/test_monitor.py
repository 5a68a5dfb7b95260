"""The framework-free monitor, driven by a plain PyTorch loop: the callback's behaviour without a Trainer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from callback_setup import memorizing_data, module_2d
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from wandb_offline import find_offline_run, history_values, read_history

from memwatch import CheckpointOptions, DiffusionScore, FileKeeper, MemwatchError, Monitor, MonitorLogger, OnsetOptions
from memwatch.collective import SingleProcess, StrategyCollective, TorchDistributed, default_collective

FAST = dict(num_probes=8, sampler_steps=10, sigmas=(0.2,), k=2, verbose=False, raise_errors=True)


def _loop(
    steps: int, monitor: Monitor | None = None, *, logger=None, seed: int = 0, data_seed: int | None = None
) -> tuple[nn.Module, dict]:
    """Train the 2-D MLP DDPM of the callback tests in a plain loop (batches of 128 drawn from the
    four corners with ``data_seed``, default ``seed``), ``monitor`` watching as a diffusers script would drive it.

    Returns:
        ``(module, {step: its weights at each check})``, stopped early when the monitor says so.
    """
    torch.manual_seed(seed)
    module = module_2d(hidden=64, depth=2)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    data, g, weights = memorizing_data(), torch.Generator().manual_seed(seed if data_seed is None else data_seed), {}
    if monitor is not None:
        monitor.start(module, logger=logger)
    for step in range(steps):
        batch = data[torch.randint(len(data), (128,), generator=g)]
        if monitor is not None:
            monitor.observe(batch, step)
        t = torch.randint(0, module.schedule.num_timesteps, (len(batch),))
        noise = torch.randn_like(batch)
        ab = module.alphas_cumprod[t][:, None]
        loss = nn.functional.mse_loss(module.net(ab.sqrt() * batch + (1 - ab).sqrt() * noise, t), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if monitor is not None and monitor.due(step + 1):
            weights[step + 1] = {k: v.clone() for k, v in module.state_dict().items()}
            monitor.check(module, step + 1)
            if monitor.should_stop:
                break
    return module, weights


def test_a_plain_loop_declares_onset_stops_and_keeps_the_clean_weights(tmp_path):
    onset = OnsetOptions(threshold=0.05, patience=1)
    monitor = Monitor(every_n_train_steps=10, stop_on_onset=True, onset=onset,
                      checkpoint=CheckpointOptions(dirpath=tmp_path / "clean"), **FAST)  # fmt: skip
    module, weights = _loop(200, monitor)
    assert monitor.onset_step is not None and max(weights) == monitor.onset_step  # stopped at the onset check
    assert [h["step"] for h in monitor.history] == [float(s) for s in sorted(weights)]
    assert monitor.history[-1]["onset"] == 1.0 and monitor.last_check.step == monitor.onset_step
    saved = torch.load(monitor.clean_checkpoint_path, weights_only=True)
    assert monitor.clean_step < monitor.onset_step and saved["global_step"] == monitor.clean_step
    expected = weights[monitor.clean_step]  # the weights of the last clean check (a check after step 0)
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in expected.items())


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    plain, _ = _loop(30)
    monitor = Monitor(every_n_train_steps=10, checkpoint=CheckpointOptions(dirpath=tmp_path), **FAST)
    watched, weights = _loop(30, monitor)
    assert sorted(weights) == [10, 20, 30] and len(monitor.history) == 3
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters()))


def test_the_state_of_a_plain_loop_resumes_and_a_check_is_not_repeated(tmp_path):
    monitor = Monitor(every_n_train_steps=10, checkpoint=CheckpointOptions(save=False), **FAST)
    _loop(20, monitor)
    resumed = Monitor(every_n_train_steps=10, checkpoint=CheckpointOptions(save=False), **FAST)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.history == monitor.history and resumed.detector.history == monitor.detector.history
    assert not resumed.due(20) and resumed.due(30) and not resumed.due(25)
    assert resumed.due(40, epoch_end=1) is False  # no epoch cadence set


def test_a_plain_loop_logs_to_a_wandb_run(tmp_path):
    wandb = pytest.importorskip("wandb")
    run = wandb.init(mode="offline", dir=tmp_path, project="memwatch-test")
    monitor = Monitor(every_n_train_steps=10, checkpoint=CheckpointOptions(save=False), **FAST)
    _loop(20, monitor, logger=run)
    run.finish()
    rows = read_history(find_offline_run(tmp_path))
    assert len([v for v in history_values(rows, "memwatch/sharp_fraction_mean") if v == v]) == 2


def test_the_logger_protocol_takes_none_a_lightning_logger_or_a_list_and_refuses_the_rest(tmp_path):
    csv = CSVLogger(tmp_path)
    assert MonitorLogger.of(None).loggers == [] and MonitorLogger.of(csv).loggers == [csv]
    assert MonitorLogger.of([csv, csv]).loggers == [csv, csv]
    with pytest.raises(MemwatchError, match="`logger` must be None, a wandb run.*got str"):
        MonitorLogger.of("wandb")


def test_a_file_keeper_refuses_full_and_reports_a_failed_save(tmp_path):
    with pytest.raises(MemwatchError, match='`checkpoint.mode`="full" .* only a Lightning Trainer'):
        FileKeeper(tmp_path, "full")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    outcome = FileKeeper(blocked).save(nn.Linear(2, 2), step=3, collective=SingleProcess())
    assert not outcome.ok and outcome.path is None and outcome.step == 3 and "Error" in outcome.error
    with pytest.raises(OSError):
        FileKeeper(blocked, raise_errors=True).save(nn.Linear(2, 2), step=3, collective=SingleProcess())


def test_a_file_keeper_in_adapter_mode_keeps_only_the_peft_adapters(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    from checkpoint_setup import lora_unet

    from memwatch.checkpoint import load_adapter_checkpoint

    trained = lora_unet()
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(1))
    keeper = FileKeeper(tmp_path, "adapter")
    keeper.check(trained)
    assert keeper.save(trained, step=7, collective=SingleProcess()).ok
    saved = torch.load(keeper.path, weights_only=True)
    assert saved["global_step"] == 7 and "state_dict" not in saved
    assert all(".lora_" in k for k in saved["memwatch_adapters"][""]["default"])
    fresh = lora_unet()  # the same base, the adapter untrained
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 50])  # the tiny UNet's 1×8×8 samples
    with torch.no_grad():
        assert not torch.allclose(fresh(x, t).sample, trained(x, t).sample, atol=1e-4)
        assert load_adapter_checkpoint(fresh, keeper.path) == [":default"]
        torch.testing.assert_close(fresh(x, t).sample, trained(x, t).sample, rtol=0, atol=0)
    with pytest.raises(MemwatchError, match='`checkpoint.mode`="adapter" saves the peft adapter weights'):
        FileKeeper(tmp_path, "adapter").check(nn.Linear(2, 2))


def test_a_failed_save_in_a_plain_loop_keeps_the_previous_record_and_warns(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monitor = Monitor(every_n_train_steps=10, checkpoint=CheckpointOptions(dirpath=blocked),
                      **{**FAST, "raise_errors": False})  # fmt: skip
    with pytest.warns(UserWarning, match="could not write the clean checkpoint"):
        _loop(10, monitor)
    assert monitor.clean_step is None and monitor.clean_checkpoint_path is None and len(monitor.history) == 1


def test_observe_or_check_before_start_is_refused():
    with pytest.raises(MemwatchError, match=r"call `start\(module\)` before `observe"):
        Monitor(**FAST).observe(torch.zeros(4, 2), 0)
    with pytest.raises(MemwatchError, match=r"call `start\(module\)` before `check"):
        Monitor(**FAST).check(module_2d(hidden=16, depth=1), 10)


class _Strategy:
    """The two strategy calls the Lightning collective makes, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def broadcast(self, obj, src):
        self.calls.append(("broadcast", obj, src))
        return obj

    def reduce_boolean_decision(self, flag, all):  # noqa: A002 - Lightning's own keyword
        self.calls.append(("reduce", flag, all))
        return flag


def test_the_collectives_of_one_process_a_strategy_and_torch_distributed(tmp_path):
    one = default_collective()
    assert isinstance(one, SingleProcess) and one.broadcast("x") == "x" and one.any_true(True)
    strategy = _Strategy()
    lightning = StrategyCollective(strategy, world_size=2, rank=1)
    assert lightning.broadcast(3) == 3 and lightning.all_true(True) and not lightning.any_true(False)
    assert strategy.calls == [("broadcast", 3, 0), ("reduce", True, True), ("reduce", False, False)]
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", world_size=1, rank=0)
    try:
        group = default_collective()
        assert isinstance(group, TorchDistributed) and (group.world_size, group.rank) == (1, 0)
        assert group.broadcast({"a": 1}) == {"a": 1} and group.all_true(True) and not group.all_true(False)
        assert group.any_true(True) and not group.any_true(False)
    finally:
        dist.destroy_process_group()


def _rank(rank: int, world: int, tmp: str) -> None:
    """One rank of a plain-loop run under ``torch.distributed`` (gloo), as ``accelerate launch``
    starts it: the same initial weights, its own batches; writes what its monitor decided."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", world_size=world, rank=rank)
    try:
        onset = OnsetOptions(threshold=0.05, patience=1)
        monitor = Monitor(every_n_train_steps=10, stop_on_onset=True, onset=onset,
                          checkpoint=CheckpointOptions(dirpath=Path(tmp) / "clean"), **FAST)  # fmt: skip
        _loop(200, monitor, data_seed=rank)
        history = [  # wall times are each rank's own; NaN as None, which compares equal
            {k: None if v != v else round(v, 9) for k, v in h.items() if k != "check_seconds" and "time/" not in k}
            for h in monitor.history
        ]
        report = dict(history=history, onset=monitor.onset_step, clean=monitor.clean_step,
                      probes=len(monitor.last_check.samples), world=monitor.collective.world_size)  # fmt: skip
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_of_a_plain_loop_under_torch_distributed_reach_one_decision(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(2, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2 and ranks[0]["probes"] + ranks[1]["probes"] == 8
    assert ranks[0]["history"] == ranks[1]["history"]  # synced values, one decision
    assert ranks[0]["onset"] == ranks[1]["onset"] is not None and ranks[0]["clean"] == ranks[1]["clean"]
    saved = torch.load(tmp_path / "clean" / "memwatch-clean.ckpt", weights_only=True)  # written by rank zero
    assert saved["global_step"] == ranks[0]["clean"]


def _accelerate_rank(rank: int, world: int, tmp: str) -> None:
    """One process of an ``accelerate`` loop on CPUs (the environment ``accelerate launch`` sets;
    the process group on a file store, which ``accelerate`` adopts, instead of a TCP port another
    run could take): the network is prepared (wrapped in DistributedDataParallel) and handed to
    the monitor as the loop holds it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0", OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", world_size=world, rank=rank)
    from accelerate import Accelerator

    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world and accelerator.process_index == rank
    torch.manual_seed(0)
    module = module_2d(hidden=64, depth=2)
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-3)
    net, optimizer = accelerator.prepare(module.net, optimizer)
    monitor = Monitor(lambda network: DiffusionScore(network, module.schedule), every_n_train_steps=10,
                      stop_on_onset=True, onset=OnsetOptions(threshold=0.05, patience=1),
                      checkpoint=CheckpointOptions(dirpath=Path(tmp) / "clean"), **FAST)  # fmt: skip
    monitor.start(net)
    data, g = memorizing_data(), torch.Generator().manual_seed(rank)
    for step in range(200):
        batch = data[torch.randint(len(data), (128,), generator=g)]
        monitor.observe(batch, step)
        t = torch.randint(0, module.schedule.num_timesteps, (len(batch),))
        noise = torch.randn_like(batch)
        ab = module.alphas_cumprod[t][:, None]
        loss = nn.functional.mse_loss(net(ab.sqrt() * batch + (1 - ab).sqrt() * noise, t), noise)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        if monitor.due(step + 1):
            monitor.check(net, step + 1)
        if monitor.should_stop:
            break
    history = [{k: None if v != v else round(v, 9) for k, v in h.items() if k != "check_seconds" and "time/" not in k}
               for h in monitor.history]  # fmt: skip
    report = dict(history=history, onset=monitor.onset_step, clean=monitor.clean_step, wrapped=type(net).__name__)
    (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(report))
    # the end of diffusers' scripts, with the wrapper (and its hold on the process group) freed before
    # the group: a gloo group freed after its destruction can wait on the other rank forever
    accelerator.wait_for_everyone()
    del net, optimizer
    accelerator.free_memory()
    accelerator.end_training()


@pytest.mark.timeout(180)  # two processes of a few seconds each: a hang fails in minutes, not at the suite's limit
def test_an_accelerate_loop_on_two_processes_hands_its_wrapped_network_over(tmp_path):
    torch.multiprocessing.spawn(_accelerate_rank, args=(2, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) >= 2
    assert ranks[0]["onset"] == ranks[1]["onset"] is not None and ranks[0]["clean"] == ranks[1]["clean"]
    saved = torch.load(tmp_path / "clean" / "memwatch-clean.ckpt", weights_only=True)
    fresh = module_2d(hidden=64, depth=2).net
    fresh.load_state_dict(saved["state_dict"])  # the network's own keys, not the wrapper's (`module.…`)
