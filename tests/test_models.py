"""The setups users train, end to end: one real ``Trainer.fit`` with the monitor per cell of
schedule kind × prediction type (MLP), and per model family (diffusers UNet2DModel with a default
DDPMScheduler, a compiled network, a latent model with a VAE, EDM preconditioning), with the
defaults around them (``verbose=True``, figures and tables on). Each asserts that checks ran and
gave finite numbers — not only that fit returned."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from callback_setup import fit, memorizing_data
from lightning.pytorch.loggers import CSVLogger
from model_setups import AnyDiffusion, DiTDiffusion, PromptDiffusion, UNetFlowModule, digits_images

import memwatch
from memwatch import MemorizationMonitor
from memwatch.apps.toymodels import TensorDataModule, tiny_unet
from memwatch.apps.toymodels import UNetDDPMModule as UNetDiffusion

SMALL = dict(num_probes=4, sampler_steps=8, raise_errors=True)  # verbose, figures, tables: defaults


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit(tmp_path, module, data, monitor, max_steps, batch_size=64):
    """:func:`callback_setup.fit` of ``module`` on ``data`` (images, or images and their labels) in
    batches of ``batch_size``, logged to CSV, not forced deterministic."""
    tensors = data if isinstance(data, tuple) else (data,)
    batches = TensorDataModule(*tensors, batch_size=batch_size)
    return fit(tmp_path, batches, monitor, max_steps, module=module, logger=CSVLogger(tmp_path), deterministic=False)[0]


#: the LID signal runs in every fit: its data LID, the probes' LIDs and their ratios are finite everywhere
LID_KEYS = ("lid/data_lid", "lid/flipd", "lid/relative", "lid/denoising", "lid/count", "lid_memorized_fraction")


def _assert_checks_ran(monitor: MemorizationMonitor, n: int, keys=("sharp_fraction_mean", "lid_mean")) -> None:
    assert len(monitor.history) == n, monitor.history
    for h in monitor.history:
        for key in (*keys, *LID_KEYS):
            assert math.isfinite(h[key]), (key, h)
        assert h["nonfinite_count"] == 0
    assert monitor.last_check is not None and bool(monitor.last_check.primary.finite.all())


# ------------------------------------------------------------------ schedule × prediction
CELLS = [
    (kind, prediction)
    for kind in ("linear", "scaled_linear", "cosine", "diffusers", "vp", "edm")
    for prediction in ("epsilon", "v_prediction", "sample", "score")
] + [("flow", "flow_prediction"), ("flow", "sample")]  # v_prediction is refused on a flow schedule


@pytest.mark.parametrize(("kind", "prediction"), CELLS)
def test_every_schedule_and_prediction_type_through_the_callback(tmp_path, kind, prediction):
    sigmas = (1.0,) if kind == "edm" else (0.3,)  # EDM data in [-1, 1]: σ_data 0.5 (Karras et al.)
    monitor = MemorizationMonitor(every_n_train_steps=20, sigmas=sigmas, k=2, **SMALL)
    _fit(tmp_path, AnyDiffusion(kind, prediction), memorizing_data(), monitor, max_steps=40)
    _assert_checks_ran(monitor, 2)
    t = next(iter(monitor.last_check.results))
    assert f"t{memwatch.reporting.format_timestep(t)}/sharp_fraction_mean" in monitor.history[-1]
    metrics = (Path(monitor._reporter.logger.loggers[0].log_dir) / "metrics.csv").read_text()
    assert "memwatch/sharp_fraction_mean" in metrics


# ------------------------------------------------------------------ model families
def test_unet_with_a_default_ddpm_scheduler_is_found_and_its_probes_stay_in_range(tmp_path):
    from diffusers import DDPMScheduler

    monitor = MemorizationMonitor(every_n_train_steps=10, k=4, **SMALL)
    module = UNetDiffusion(tiny_unet(), DDPMScheduler())  # clip_sample=True, 1000 steps
    with pytest.warns(Warning) as seen:
        _fit(tmp_path, module, digits_images(8), monitor, max_steps=20, batch_size=8)
    assert not [w for w in seen if "left the data range" in str(w.message)]
    _assert_checks_ran(monitor, 2)
    assert monitor.last_check.samples.abs().max() <= 1.0 + 1e-5  # clipped as diffusers' own DDIM clips
    assert monitor.last_check.primary.method == "dense" and monitor.history[-1]["out_of_range_count"] == 0


@pytest.mark.parametrize("scheduler_kwargs", [dict(shift=3.0), dict(use_dynamic_shifting=True)])
def test_unet_with_a_flow_matching_scheduler_is_found_with_no_glue(tmp_path, scheduler_kwargs):
    """The SD3 / Flux recipe on a UNet2DModel: the scheduler on the module is all memwatch needs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    monitor = MemorizationMonitor(every_n_train_steps=10, k=4, **SMALL)
    module = UNetFlowModule(tiny_unet(), FlowMatchEulerDiscreteScheduler(**scheduler_kwargs))
    _fit(tmp_path, module, digits_images(8), monitor, max_steps=20, batch_size=8)
    _assert_checks_ran(monitor, 2)
    assert monitor._found.prediction == "flow_prediction" and monitor._found.schedule.kind == "flow"
    d = 64  # 1 × 8 × 8 digits
    for h in monitor.history:
        assert 0 <= h["lid_mean"] <= d and 0 <= h["lid/flipd"] <= d, h


def test_a_unet_counts_copies_of_the_images_in_its_batches(tmp_path):
    from diffusers import DDPMScheduler

    from memwatch.groundtruth import nn_ratio

    images = digits_images(8, 16)  # [8, 1, 16, 16]: d = 256, the trace tier is not used below d = 384
    monitor = MemorizationMonitor(
        every_n_train_steps=10, k=4, reference_data="batches", onset_on="either", log_media=True, **SMALL
    )
    _fit(tmp_path, UNetDiffusion(tiny_unet(size=16), DDPMScheduler()), images, monitor, max_steps=20, batch_size=8)
    _assert_checks_ran(monitor, 2, keys=("sharp_fraction_mean", "nn_memorized_fraction", "flagged_fraction"))
    check = monitor.last_check
    torch.testing.assert_close(check.nn_ratio.double(), nn_ratio(check.samples, images), rtol=1e-5, atol=1e-6)
    metrics = (Path(monitor._reporter.logger.loggers[0].log_dir) / "metrics.csv").read_text()
    assert "memwatch/flagged_fraction" in metrics


def test_batches_in_another_shape_than_the_probes_fail_at_the_first_batch(tmp_path):
    """A UNet's config says 8×8 while it trains on 16×16 images (UNets take any size): the scale or
    the copies would be measured between different spaces, so the first batch fails loudly."""
    from diffusers import DDPMScheduler

    for kwargs in (dict(reference_data="batches"), dict(sigmas="auto")):
        monitor = MemorizationMonitor(every_n_train_steps=10, k=4, **kwargs, **SMALL)
        with pytest.raises(ValueError, match=r"samples of shape \(1, 16, 16\) and the probes have shape \(1, 8, 8\)"):
            _fit(tmp_path, UNetDiffusion(tiny_unet(), DDPMScheduler()), digits_images(8, 16), monitor, 10, 8)


def test_a_compiled_network_is_found_through_its_original_module(tmp_path):
    from diffusers import DDPMScheduler

    unet = tiny_unet()
    try:
        compiled = torch.compile(unet, backend="eager")  # dynamo wraps it; no code generation on CPU
    except Exception as err:  # noqa: BLE001 - compile is optional in some torch builds
        pytest.skip(f"torch.compile is unavailable here: {err}")
    monitor = MemorizationMonitor(every_n_train_steps=10, k=4, method="trace", **SMALL)
    _fit(tmp_path, UNetDiffusion(compiled, DDPMScheduler(num_train_timesteps=100)), digits_images(8), monitor, 10, 8)
    _assert_checks_ran(monitor, 1, keys=("lid_mean",))
    assert monitor._found.model is unet


def test_latent_model_with_decoded_galleries(tmp_path):
    from diffusers import DDPMScheduler

    vae = _tiny_vae()
    images = digits_images(8, size=16)

    def encode(x):
        return vae.encode(x).latent_dist.mode()

    def decode(z):
        return vae.decode(z).sample

    with torch.no_grad():
        latents = encode(images)  # [8, 4, 8, 8]: the model trains in latent space
    monitor = MemorizationMonitor(
        every_n_train_steps=10, k=4, method="trace", log_media=True, decode_fn=decode, encode_fn=encode,
        reference_data=images, **SMALL,
    )  # fmt: skip
    unet = tiny_unet(channels=4)
    _fit(tmp_path, UNetDiffusion(unet, DDPMScheduler(num_train_timesteps=100)), latents, monitor, 10, 8)
    _assert_checks_ran(monitor, 1, keys=("lid_mean", "nn_memorized_fraction"))
    gallery = list(Path(tmp_path).rglob("most_memorized_step10.png"))
    assert gallery and gallery[0].stat().st_size > 1000  # decoded to 1-channel images, not skipped


@pytest.mark.parametrize(
    ("family", "flow"),
    [("dit", False), ("pixart", False), ("sd3", False), ("flux", False), ("sd3", True), ("flux", True)],
)
def test_a_diffusion_transformer_and_its_scheduler_are_found_with_no_glue(tmp_path, family, flow):
    """The README's UNet recipe with a DiT (its null class found in its label embedding) or a text
    transformer (its empty prompt kept by the module as `memwatch_null_cond`), the monitor at its defaults;
    SD3 and Flux also as their scripts train them, with a FlowMatch scheduler and the velocity target."""
    from memwatch.transformer_score import TransformerScore

    images = digits_images(8)  # [8, 1, 8, 8]: d = 64
    labels = torch.arange(8) % 4
    module = DiTDiffusion() if family == "dit" else PromptDiffusion(family, flow=flow)
    # a prompt to watch, in the form of the null condition (one family: the conditional metrics double the cost)
    watched = {"class 1": module.condition(1)} if family == "sd3" else None
    monitor = MemorizationMonitor(every_n_train_steps=5, conditions=watched, **SMALL)
    _fit(tmp_path, module, (images, labels), monitor, max_steps=10, batch_size=8)
    keys = ("sharp_fraction_mean", "lid_mean") + (("cond/class_1/score_diff",) if watched else ())
    _assert_checks_ran(monitor, 2, keys=keys)
    assert isinstance(monitor._found, TransformerScore) and monitor._found.model is module.transformer
    assert all(0 <= h["lid_mean"] <= 64 for h in monitor.history)  # d · (1 - sharp fraction)
    found = (monitor._found.schedule.kind, monitor._found.prediction)
    assert found == (("flow", "flow_prediction") if flow else ("discrete", "epsilon"))


def test_a_lora_fine_tune_is_measured_as_adapted_and_its_clean_checkpoint_holds_the_adapter(tmp_path):
    from checkpoint_setup import LoraUNetModule

    from memwatch.checkpoint import load_adapter_checkpoint

    pytest.importorskip("peft")
    module = LoraUNetModule()  # peft's get_peft_model around a UNet2DModel; its scheduler an attribute
    monitor = MemorizationMonitor(every_n_train_steps=5, checkpoint=memwatch.CheckpointOptions(mode="adapter"), **SMALL)
    _fit(tmp_path, module, digits_images(8), monitor, max_steps=10, batch_size=8)
    _assert_checks_ran(monitor, 2)
    assert all(0 <= h["lid_mean"] <= 64 for h in monitor.history)
    assert monitor._found.model is module.unet.base_model.model  # the adapted UNet: LoRA layers in place
    assert monitor.clean_step == 10 and monitor.clean_checkpoint_path.is_file()
    fresh, x, t = LoraUNetModule(), digits_images(2), torch.tensor([20, 70])
    load_adapter_checkpoint(fresh, monitor.clean_checkpoint_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, t).sample, module.unet(x, t).sample, rtol=0, atol=0)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def test_a_latent_model_trained_on_pixel_batches_calibrates_in_latent_space(tmp_path):
    """The common latent-diffusion recipe: the data module yields pixels, `training_step` encodes.
    The default `sigmas="auto"` must measure the latents' scale, through `encode_fn`, which sees
    only the rows the monitor keeps (each of the 8 images once), never the other batch rows."""
    from diffusers import DDPMScheduler

    from memwatch.groundtruth import median_nn_distance

    torch.manual_seed(0)
    vae = _tiny_vae()
    images = digits_images(8, size=16)
    seen_by_monitor = []

    def encode(x):
        seen_by_monitor.append(x.shape[0])
        return vae.encode(x).latent_dist.mode()

    class PixelBatches(UNetDiffusion):
        def training_step(self, batch, batch_idx):
            with torch.no_grad():
                latents = vae.encode(batch[0]).latent_dist.mode()
            return super().training_step(latents, batch_idx)

    monitor = MemorizationMonitor(every_n_train_steps=10, k=4, method="trace", encode_fn=encode, **SMALL)
    _fit(tmp_path, PixelBatches(tiny_unet(channels=4), DDPMScheduler(num_train_timesteps=100)), images, monitor, 20, 8)
    _assert_checks_ran(monitor, 2, keys=("lid_mean",))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    assert monitor.data_scale.median == pytest.approx(median_nn_distance(latents), rel=1e-5)
    assert monitor.calibrated_sigmas == pytest.approx((0.1 * median_nn_distance(latents),), rel=1e-5)
    assert sum(seen_by_monitor) == len(images)  # kept rows only: 20 batches of 8 rows, 8 distinct images


def test_pixel_reference_data_for_a_latent_model_fails_at_fit_start_with_the_argument_named(tmp_path):
    from diffusers import DDPMScheduler

    monitor = MemorizationMonitor(every_n_train_steps=10, reference_data=digits_images(8, 16), **SMALL)
    with pytest.raises(ValueError, match="reference_data"):
        _fit(tmp_path, UNetDiffusion(tiny_unet(4), DDPMScheduler(num_train_timesteps=100)), torch.randn(8, 4, 8, 8),
             monitor, 10, 8)  # fmt: skip


def test_a_model_whose_output_shape_differs_fails_at_fit_start(tmp_path):
    class Halves(torch.nn.Module):
        def forward(self, x, t):
            return x[:, :1]

    module = AnyDiffusion("linear", "epsilon")
    module.memwatch_score = lambda: memwatch.DiffusionScore(Halves(), module.schedule)
    with pytest.raises(ValueError, match="shape"):
        _fit(tmp_path, module, memorizing_data(), MemorizationMonitor(every_n_train_steps=10, **SMALL), 10)


def test_sample_shape_that_does_not_fit_the_model_fails_at_fit_start(tmp_path):
    monitor = MemorizationMonitor(every_n_train_steps=10, sample_shape=(3,), k=2, **SMALL)
    with pytest.raises(ValueError, match="sample_shape"):
        _fit(tmp_path, AnyDiffusion("linear", "epsilon"), memorizing_data(), monitor, 10)


def test_text_conditional_unet_with_named_prompt_embeddings_and_verbose_checks(tmp_path, capsys):
    from diffusers import DDPMScheduler

    embeddings = {"a photo of a cat": torch.randn(4, 16), "a photo of a dog": torch.randn(4, 16)}
    null = torch.zeros(4, 16)  # one embedding [L, E]: the empty prompt

    class TextUNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.unet, self.scheduler = tiny_unet(4, 8, conditional=True), DDPMScheduler(num_train_timesteps=100)

        def memwatch_score(self):
            schedule = memwatch.NoiseSchedule.from_diffusers(self.scheduler)
            return memwatch.DiffusionScore(self.unet, schedule, cond_kwarg="encoder_hidden_states", null_cond=null)

        def training_step(self, batch, batch_idx):
            x0 = batch[0]
            t = torch.randint(0, 100, (x0.shape[0],))
            eps = torch.randn_like(x0)
            cond = torch.stack(list(embeddings.values()))[torch.arange(x0.shape[0]) % 2]
            out = self.unet(self.scheduler.add_noise(x0, eps, t), t, encoder_hidden_states=cond).sample
            return torch.nn.functional.mse_loss(out, eps)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    monitor = MemorizationMonitor(every_n_train_steps=5, k=2, method="trace", conditions=embeddings, **SMALL)
    _fit(tmp_path, TextUNet(), torch.randn(8, 4, 8, 8).clamp(-1, 1), monitor, max_steps=5, batch_size=4)
    _assert_checks_ran(monitor, 1, keys=("lid_mean", "hessian_score_norm_mean"))
    values = monitor.history[-1]
    for key in ("a_photo_of_a_cat", "a_photo_of_a_dog"):
        assert math.isfinite(values[f"cond/{key}/hessian_score_diff"]) and math.isfinite(
            values[f"cond/{key}/score_diff"]
        )
    assert monitor.last_check.most_memorized_condition in embeddings
    assert values["most_memorized_condition"] in (0.0, 1.0)  # the index of the named condition
