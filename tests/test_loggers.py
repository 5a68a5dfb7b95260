"""Tests for memwatch/loggers.py against real loggers: W&B offline runs are read back from disk
(tests/wandb_offline.py), CSV and TensorBoard output from their files. Nothing is mocked."""

from __future__ import annotations

import csv
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import fit
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_offline import (
    _HEADER,
    _payloads,
    find_offline_run,
    history_values,
    media_files,
    read_history,
    read_media_json,
    read_records,
    record_types,
)

from memwatch.loggers import MonitorLogger, finish_wandb, wandb_logger

STEP = 7  # scalars; each media type gets its own step, so a row that lacks its own
# trainer/global_step (W&B's step_sync would copy the last one in) shows up as a wrong step
HIST, FIG, IMGS, TABLE = STEP + 1, STEP + 2, STEP + 3, STEP + 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Offline, silent W&B writing under tmp_path; any run left open is finished afterwards."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) rewrites it; restored
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield tmp_path
    wandb.finish()


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Run(pl.Callback):
    """Builds the MonitorLogger in ``setup`` (as the memwatch callback does) and runs ``action``
    on it after the first training batch."""

    def __init__(self, action: Callable[[MonitorLogger], None], log_media: bool) -> None:
        self.action, self.log_media = action, log_media

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.monitor = MonitorLogger.from_trainer(trainer, log_media=self.log_media)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.action(self.monitor)


def _fit(tmp_path: Path, logger: Any, action: Callable[[MonitorLogger], None], log_media: bool = False) -> None:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)
    run = _Run(action, log_media)
    fit(tmp_path, data, run, 1, seed=None, module=_Tiny(), logger=logger, log_every_n_steps=1, deterministic=False)


def _figure() -> Figure:
    fig = Figure(figsize=(2, 2))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1, 2], [1, 0, 1])
    return fig


def _log_everything(ml: MonitorLogger) -> None:
    ml.define_metrics()
    ml.define_metrics()  # idempotent
    ml.log_scalars({"lid_mean": 3.0, "onset": torch.tensor(1), "lambda_min": torch.tensor([-2.5])}, STEP)
    ml.log_histogram("normalized_eigs", torch.tensor([[-1.0, -0.9], [0.0, float("nan")]]), HIST)
    ml.log_figure("spectrum", _figure(), FIG)
    ml.log_images("probes", torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4), IMGS, captions=["a", "b"])
    ml.log_table("probes_table", ["probe", "lid"], [[0, 1.5], [1, torch.tensor(2.5)]], TABLE)
    ml.alert("memorization onset", "sharp fraction crossed the threshold")


def _only(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    found = [row for row in rows if key in row]
    assert len(found) == 1, f"{key}: {len(found)} rows, keys seen: {sorted({k for r in rows for k in r})}"
    return found[0]


# ------------------------------------------------------------------------------------------------
# W&B
# ------------------------------------------------------------------------------------------------
def test_wandb_offline_everything_lands_in_the_run(wandb_env: Path) -> None:
    import wandb

    _fit(wandb_env, WandbLogger(offline=True, save_dir=str(wandb_env)), _log_everything, log_media=True)
    wandb.finish()
    run_dir = find_offline_run(wandb_env)
    rows = read_history(run_dir)

    scalars = _only(rows, "memwatch/lid_mean")
    assert scalars["memwatch/lid_mean"] == 3.0
    assert scalars["memwatch/onset"] == 1
    assert scalars["memwatch/lambda_min"] == -2.5
    assert scalars["trainer/global_step"] == STEP
    memwatch_rows = [r for r in rows if any(k.startswith("memwatch/") for k in r)]
    assert len(memwatch_rows) == 5  # scalars, histogram, figure, images, table
    for key, step in [("normalized_eigs", HIST), ("spectrum", FIG), ("probes", IMGS), ("probes_table", TABLE)]:
        assert _only(rows, f"memwatch/{key}")["trainer/global_step"] == step, key

    hist = _only(rows, "memwatch/normalized_eigs")["memwatch/normalized_eigs"]
    assert hist["_type"] == "histogram"
    assert sum(hist["values"]) == 3  # the NaN is dropped
    assert min(hist["bins"]) == -1.0 and max(hist["bins"]) == 0.0

    fig = _only(rows, "memwatch/spectrum")["memwatch/spectrum"]
    assert fig["_type"] == "image-file" and fig["format"] == "png"
    assert (fig["width"], fig["height"]) == (200, 200)  # 2 in x 100 dpi
    assert (run_dir / "files" / fig["path"]).read_bytes().startswith(PNG_MAGIC)

    imgs = _only(rows, "memwatch/probes")["memwatch/probes"]
    assert imgs["_type"] == "images/separated" and imgs["count"] == 2
    assert imgs["captions"] == ["a", "b"] and (imgs["width"], imgs["height"]) == (4, 4)
    for name in imgs["filenames"]:
        assert (run_dir / "files" / name).read_bytes().startswith(PNG_MAGIC)
    assert len(media_files(run_dir, ".png")) == 3

    table = _only(rows, "memwatch/probes_table")["memwatch/probes_table"]
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (2, 2)
    assert read_media_json(run_dir, table) == {"columns": ["probe", "lid"], "data": [[0, 1.5], [1, 2.5]]}

    records = read_records(run_dir)
    ours = [r.metric for r in records if r.WhichOneof("record_type") == "metric" and r.metric.glob_name == "memwatch/*"]
    assert len(ours) == 1 and ours[0].step_metric == "trainer/global_step"
    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert [(a.title, a.level) for a in alerts] == [("memorization onset", "WARN")]
    assert history_values(rows, "train_loss") == []  # the module logs nothing itself


def test_wandb_log_images_is_a_no_op_without_log_media(wandb_env: Path) -> None:
    import wandb

    def action(ml: MonitorLogger) -> None:
        ml.log_images("probes", torch.zeros(2, 1, 4, 4), STEP)
        ml.log_scalars({"lid_mean": 1.0}, STEP)  # positive control: the run is read back

    _fit(wandb_env, WandbLogger(offline=True, save_dir=str(wandb_env)), action, log_media=False)
    wandb.finish()
    run_dir = find_offline_run(wandb_env)
    rows = read_history(run_dir)
    assert history_values(rows, "memwatch/lid_mean") == [1.0]
    assert history_values(rows, "memwatch/probes") == []
    assert media_files(run_dir) == []


def test_wandb_logger_prefix_is_respected(wandb_env: Path) -> None:
    import wandb

    def action(ml: MonitorLogger) -> None:
        ml.define_metrics()
        ml.log_scalars({"lid_mean": 2.0}, STEP)
        ml.log_histogram("eigs", torch.tensor([-1.0, 0.0]), STEP)

    _fit(wandb_env, WandbLogger(offline=True, save_dir=str(wandb_env), prefix="fit"), action)
    wandb.finish()
    run_dir = find_offline_run(wandb_env)
    rows = read_history(run_dir)
    assert history_values(rows, "fit-memwatch/lid_mean") == [2.0]
    assert history_values(rows, "fit-memwatch/eigs")[0]["_type"] == "histogram"
    globs = [r.metric.glob_name for r in read_records(run_dir) if r.WhichOneof("record_type") == "metric"]
    assert "fit-memwatch/*" in globs


def test_reader_reassembles_fragments_and_rejects_corruption(wandb_env: Path) -> None:
    import wandb

    run = wandb.init(mode="offline", dir=str(wandb_env), project="memwatch-test")
    for i in range(50):
        run.log({"x": i})
    run.log({"big": "y" * 100_000})  # > 3 blocks: FIRST / MIDDLE / LAST fragments
    run.finish()
    run_dir = find_offline_run(wandb_env)
    rows = read_history(run_dir)
    assert history_values(rows, "x") == list(range(50))
    assert history_values(rows, "big") == ["y" * 100_000]
    assert {"run", "history", "exit"} <= set(record_types(read_records(run_dir)))

    data = bytearray(next(run_dir.glob("run-*.wandb")).read_bytes())
    frame = struct.unpack_from("<IHB", data, len(_HEADER))
    data[len(_HEADER) + 7 + frame[1] // 2] ^= 0xFF  # one flipped bit in the first payload
    with pytest.raises(ValueError, match="CRC"):
        list(_payloads(bytes(data)))
    with pytest.raises(ValueError, match="header"):
        list(_payloads(b"not a wandb file"))
    unfinished = wandb_env / "run-unfinished.wandb"  # what `finish` can leave for a moment
    unfinished.write_bytes(_HEADER)
    with pytest.raises(TimeoutError, match="no exit record"):
        read_records(unfinished, timeout=0.1)


# ------------------------------------------------------------------------------------------------
# CSV, TensorBoard, none, unknown
# ------------------------------------------------------------------------------------------------
def test_csv_scalars_and_files(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, logger, _log_everything, log_media=True)
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("memwatch/lid_mean")]
    assert len(rows) == 1
    assert float(rows[0]["memwatch/lid_mean"]) == 3.0 and float(rows[0]["memwatch/onset"]) == 1.0
    assert float(rows[0]["memwatch/lambda_min"]) == -2.5 and int(rows[0]["step"]) == STEP

    out = Path(logger.log_dir) / "memwatch"
    assert sorted(p.name for p in out.iterdir()) == [
        f"probes_0_step{IMGS}.png",
        f"probes_1_step{IMGS}.png",
        f"probes_table_step{TABLE}.csv",
        f"spectrum_step{FIG}.png",
    ]  # no histogram file, no alert
    assert (out / f"spectrum_step{FIG}.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / f"probes_table_step{TABLE}.csv").read_text().splitlines() == ["probe,lid", "0,1.5", "1,2.5"]


def test_csv_log_images_without_log_media_writes_nothing(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    ml = MonitorLogger([logger], log_media=False)
    ml.log_images("probes", torch.zeros(2, 3, 4, 4), STEP)
    assert not (Path(logger.log_dir) / "memwatch").exists()


def test_media_only_on_global_rank_zero(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    ml = MonitorLogger([logger], log_media=True, is_global_zero=False)
    ml.log_figure("spectrum", _figure(), STEP)
    ml.log_images("probes", torch.zeros(1, 1, 4, 4), STEP)
    ml.log_table("t", ["a"], [[1]], STEP)
    assert not (Path(logger.log_dir) / "memwatch").exists()


def test_tensorboard(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    _fit(tmp_path, logger, _log_everything, log_media=True)
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("memwatch/lid_mean")] == [(STEP, 3.0)]
    [hist] = acc.Histograms("memwatch/normalized_eigs")
    assert (hist.step, hist.histogram_value.num) == (HIST, 3)
    assert [e.step for e in acc.Images("memwatch/spectrum")] == [FIG]
    assert [e.step for e in acc.Images("memwatch/probes")] == [IMGS]  # add_images: one grid
    assert [p.name for p in (Path(logger.log_dir) / "memwatch").iterdir()] == [f"probes_table_step{TABLE}.csv"]


def test_no_logger_is_a_no_op(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    _fit(tmp_path, False, _log_everything, log_media=True)
    fig = plt.figure()
    MonitorLogger([], log_media=True).log_figure("f", fig, 0)
    assert not plt.fignum_exists(fig.number)  # closed even though nothing was logged
    assert not any(p.suffix in {".png", ".csv"} for p in tmp_path.rglob("*"))


class _ListLogger(Logger):
    """An unknown logger type: no directory, no media support."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def test_unknown_logger_gets_scalars_only(tmp_path: Path) -> None:
    logger = _ListLogger()
    _fit(tmp_path, logger, _log_everything, log_media=True)
    ours = [(m, s) for m, s in logger.calls if any(k.startswith("memwatch/") for k in m)]
    assert ours == [({"memwatch/lid_mean": 3.0, "memwatch/onset": 1.0, "memwatch/lambda_min": -2.5}, STEP)]
    assert all(isinstance(v, float) for v in ours[0][0].values())


def test_bad_inputs_name_the_argument(tmp_path: Path) -> None:
    ml = MonitorLogger([CSVLogger(tmp_path)], log_media=True)
    with pytest.raises(ValueError, match="lid_mean"):
        ml.log_scalars({"lid_mean": torch.ones(3)}, 0)
    with pytest.raises(ValueError, match=r"images.*\(2, 4, 4\)"):
        ml.log_images("x", torch.zeros(2, 4, 4), 0)
    with pytest.raises(ValueError, match="captions"):
        ml.log_images("x", torch.zeros(2, 1, 4, 4), 0, captions=["one"])
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        ml.log_table("t", ["a", "b"], [[1, 2], [3]], 0)
    with pytest.raises(ValueError, match="level"):
        ml.alert("t", "x", level="LOUD")
    with pytest.raises(ValueError, match="prefix"):
        MonitorLogger([], prefix="")


def test_wandb_logger_modes_and_finish(wandb_env: Path) -> None:
    assert wandb_logger("disabled", wandb_env / "none") is None
    with pytest.raises(ValueError, match="`mode`"):
        wandb_logger("offlne", wandb_env)
    logger = wandb_logger("offline", wandb_env / "runs", project="memwatch-test", name="helper")
    logger.log_metrics({"memwatch/x": 1.0}, step=1)
    run_dir = finish_wandb(logger)
    assert run_dir.parent == (wandb_env / "runs" / "wandb").resolve() and run_dir.name.startswith("offline-run-")
    assert history_values(read_history(run_dir), "memwatch/x") == [1.0]
