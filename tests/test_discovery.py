"""Finding the score, the EMA weights and the probe shape on a LightningModule; setup-time checks."""

from __future__ import annotations

import copy
import gc
import re
import weakref

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from memwatch.apps.toymodels import tiny_unet
from memwatch.discovery import (
    check_score,
    diffusers_score,
    find_score,
    measured_score,
    sample_shape_of,
)
from memwatch.errors import MemwatchError
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore
from memwatch.transformer_score import TransformerScore, dropped_label, joint_condition

diffusers = pytest.importorskip("diffusers")

T = 50  # the probes' timestep (of a 100-step DDPM schedule)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny UNets: one thread is many times faster than two on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet(in_channels=3, out_channels=3, sample_size=8, **kwargs):
    torch.manual_seed(0)
    return tiny_unet(in_channels, sample_size, out_channels=out_channels, **kwargs)


def cond_unet():
    torch.manual_seed(0)
    return tiny_unet(4, conditional=True)


def scheduler(**kwargs):
    return diffusers.DDPMScheduler(num_train_timesteps=100, **kwargs)


class Holder(pl.LightningModule):
    """A LightningModule that only holds the given attributes."""

    def __init__(self, **attributes):
        super().__init__()
        for name, value in attributes.items():
            setattr(self, name, value)


def probes(shape, n=2):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def perturbed(module):
    """``module``'s parameters moved away from their initial values (a stand-in for training)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def params_of(module):
    return [p.detach().clone() for p in module.parameters()]


# ------------------------------------------------------------------------ find_score
def test_finds_a_unet2d_and_its_scheduler():
    net, sched = unet(), scheduler(prediction_type="v_prediction")
    score = find_score(Holder(unet=net, noise_scheduler=sched))
    assert score.model is net and score.cond_kwarg is None and score.prediction == "v_prediction"
    assert torch.equal(score.schedule.alphas_cumprod, NoiseSchedule.from_diffusers(sched).alphas_cumprod)
    assert score(probes((3, 8, 8)), T).shape == (2, 3, 8, 8)
    assert sample_shape_of(score) == (3, 8, 8)
    check_score(score, (3, 8, 8), device="cpu")


def test_class_conditional_unet2d_takes_class_labels():
    net = unet(num_class_embeds=4)
    score = find_score(Holder(unet=net, scheduler=scheduler()))
    assert score.model is net and score.cond_kwarg == "class_labels"
    x, labels = probes((3, 8, 8)), torch.tensor([1, 3])
    s = score(x, T, labels)
    assert s.shape == x.shape and not torch.allclose(s, score(x, T, torch.tensor([0, 0])))
    check_score(score, (3, 8, 8), device="cpu", cond=labels)
    with pytest.raises(MemwatchError, match=r"conditional \(`class_labels`\).*`null_cond=`"):
        check_score(score, (3, 8, 8), device="cpu")


def test_finds_a_unet2d_condition_model_with_encoder_hidden_states():
    net = cond_unet()
    score = find_score(Holder(unet=net, scheduler=scheduler()))
    assert score.model is net and score.cond_kwarg == "encoder_hidden_states" and score.prediction == "epsilon"
    assert sample_shape_of(score) == (4, 8, 8)
    x = probes((4, 8, 8))
    emb = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    s = score(x, T, emb)
    assert s.shape == (2, 4, 8, 8) and torch.isfinite(s).all()
    assert torch.allclose(score(x, T, emb[:1]), score(x, T, emb[:1].expand(2, 5, 16)))  # one prompt for all
    check_score(score, (4, 8, 8), device="cpu", cond=emb)
    with pytest.raises(MemwatchError, match=r"encoder_hidden_states.*null_cond"):
        check_score(score, (4, 8, 8), device="cpu")
    named = find_score(Holder(unet=net, scheduler=scheduler(), memwatch_null_cond=emb[0]))  # the empty prompt
    assert torch.equal(named.null_cond, emb[0]) and named.cond_kwarg == "encoder_hidden_states"
    check_score(named, (4, 8, 8), device="cpu")
    # a guided score without null_cond: the unconditional half is the one that fails
    guided = DiffusionScore(net, score.schedule, cond_kwarg="encoder_hidden_states", guidance_scale=3.0)
    with pytest.raises(MemwatchError, match="null_cond"):
        check_score(guided, (4, 8, 8), device="cpu", cond=emb)


def test_compiled_unet_is_measured_through_its_eager_module():
    net = unet()
    try:
        compiled = torch.compile(net)
    except RuntimeError as err:  # torch.compile unsupported on this platform / Python
        pytest.skip(f"torch.compile unavailable: {err}")
    module = Holder(unet=compiled, scheduler=scheduler())
    score = find_score(module)
    assert score.model is net  # the same parameters the compiled forward trains, without recompiling
    assert score(probes((3, 8, 8)), T).shape == (2, 3, 8, 8) and sample_shape_of(score) == (3, 8, 8)
    # a user score around the compiled module is unwrapped too, other settings kept
    module.memwatch_score = lambda: DiffusionScore(compiled, score.schedule, "sample", cond_kwarg="y")
    user = find_score(module)
    assert user.model is net and (user.prediction, user.cond_kwarg) == ("sample", "y")


def test_attributes_whose_lookup_raises_are_skipped():
    class Proxy:
        def __getattr__(self, name):
            raise RuntimeError("not connected")

    net = unet()
    assert find_score(Holder(unet=net, scheduler=scheduler(), remote=Proxy())).model is net


def test_precedence_score_fn_then_memwatch_score_then_diffusers():
    net, sched = unet(), scheduler()
    module = Holder(unet=net, scheduler=sched)
    other = DiffusionScore(lambda x, t: 0 * x, NoiseSchedule.linear(10))
    module.memwatch_score = lambda: other
    assert find_score(module) is other
    explicit = DiffusionScore(lambda x, t: x, NoiseSchedule.linear(10))
    assert find_score(module, lambda m: explicit) is explicit
    with pytest.raises(MemwatchError, match=r"`score_fn` must return a memwatch.DiffusionScore, got UNet2DModel"):
        find_score(module, lambda m: m.unet)


def test_several_networks_the_trainable_one_or_an_error():
    net = unet()
    frozen_copy = copy.deepcopy(net).requires_grad_(False)
    averaged = torch.optim.swa_utils.AveragedModel(net)  # trainable, but an EMA: never descended into
    found = find_score(Holder(unet=net, ema_unet=frozen_copy, swa=averaged, scheduler=scheduler()))
    assert found.model is net
    # the EMA named by ema_attr is excluded even when trainable
    assert find_score(Holder(unet=net, ema=copy.deepcopy(net), scheduler=scheduler()), ema_attr="ema").model is net
    with pytest.raises(MemwatchError, match=r"several diffusion networks.*`unet`.*`second`.*score_fn"):
        find_score(Holder(unet=net, second=cond_unet(), scheduler=scheduler()))


def test_nested_network_and_pipeline_are_found():
    net, sched = unet(), scheduler()
    wrapper = nn.Module()
    wrapper.backbone = net
    assert find_score(Holder(model=wrapper, scheduler=sched)).model is net
    pipe = diffusers.DDPMPipeline(unet=net, scheduler=sched)
    assert find_score(Holder(pipeline=pipe)).model is net


def test_schedulers_must_agree():
    net, sched = unet(), scheduler()
    ddim = diffusers.DDIMScheduler.from_config(sched.config)  # same betas: a sampling scheduler
    assert find_score(Holder(unet=net, scheduler=sched, sampler=ddim)).model is net
    with pytest.raises(MemwatchError, match=r"schedulers `scheduler` and `other`"):
        find_score(Holder(unet=net, scheduler=sched, other=scheduler(beta_schedule="squaredcos_cap_v2")))
    with pytest.raises(MemwatchError, match=r"prediction_type='flow'.*score_fn"):
        bad = scheduler()
        bad.register_to_config(prediction_type="flow")
        find_score(Holder(unet=net, scheduler=bad))


def test_a_flow_matching_scheduler_is_found_and_read_as_flow():
    net, flow = unet(), diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    score = find_score(Holder(unet=net, scheduler=flow))
    assert score.model is net and score.prediction == "flow_prediction"
    assert score.schedule.kind == "flow" and score.schedule.time_scale == 1000.0
    assert score.schedule.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    # the network sees diffusers' timestep σ · 1000 and its velocity is read as ε - x_0
    x = probes((3, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(score.velocity(x, 400.0), net(x, torch.full((2,), 400.0)).sample)
    same = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flow.config)
    assert find_score(Holder(unet=net, scheduler=flow, sampler=same)).model is net
    with pytest.raises(MemwatchError, match=r"schedulers `scheduler` and `other`"):
        find_score(Holder(unet=net, scheduler=flow, other=diffusers.FlowMatchEulerDiscreteScheduler()))
    with pytest.raises(MemwatchError, match=r"schedulers `scheduler` and `other`"):
        find_score(Holder(unet=net, scheduler=flow, other=scheduler()))


def test_a_solver_on_flow_sigmas_is_found_as_flow_with_its_prediction():
    solver = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    score = find_score(Holder(unet=unet(), scheduler=solver))
    assert (score.schedule.kind, score.prediction) == ("flow", "flow_prediction")
    assert score.schedule.scheduler_class == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize(
    "attributes, found",
    [
        ({}, "no diffusers network and no scheduler"),
        ({"unet": "net"}, r"the network `unet` \(UNet2DModel\).*but no scheduler with `alphas_cumprod` or flow-"),
        ({"scheduler": "sched"}, r"the scheduler `scheduler` \(DDPMScheduler\).*but no UNet2DModel / UNet2DCond"),
        ({"ema": "shadow", "scheduler": "sched"}, r"EMAModel `ema` \(shadow weights, not a network\)"),
    ],
)
def test_nothing_found_says_what_was_found_and_every_option(attributes, found):
    net = unet()
    values = {
        "net": net,
        "sched": scheduler(),
        "shadow": diffusers.training_utils.EMAModel(net.parameters()),
    }
    module = Holder(**{name: values[v] for name, v in attributes.items()})
    with pytest.raises(MemwatchError) as info:
        find_score(module)
    message = str(info.value)
    assert re.search(found, message), message
    for option in ("score_fn=", "memwatch_score()", "UNet2DConditionModel", "torch.compile", "EMAModel", "ema_attr="):
        assert option in message


# ------------------------------------------------------------------------ diffusers image transformers
def dit(learned_sigma=True, classes=3):
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4 if learned_sigma else 2,
        num_layers=1, sample_size=8, num_embeds_ada_norm=classes,
    )  # fmt: skip


def pixart(**kwargs):
    torch.manual_seed(0)
    config = dict(num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4, num_layers=1,
                  sample_size=8, cross_attention_dim=16, caption_channels=12)  # fmt: skip
    return diffusers.PixArtTransformer2DModel(**{**config, **kwargs})


def sd3():
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=8,
    )  # fmt: skip


def flux(guidance_embeds=True):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=6, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip


def eps_score(eps, schedule, t):
    """The score of a noise prediction ``eps`` at step ``t``: ``-eps / σ_t`` (the dense reference)."""
    return -eps / schedule.sigma(torch.tensor(t)).float()


def test_a_dit_is_found_with_its_dropped_label_as_null_class_and_its_noise_half():
    net = dit()
    score = find_score(Holder(transformer=net, scheduler=scheduler()))
    assert isinstance(score, TransformerScore) and score.model is net and score.cond_kwarg == "class_labels"
    assert int(score.null_cond) == 3 == dropped_label(net)  # the row that label dropout trains as "no class"
    assert sample_shape_of(score) == (2, 8, 8)
    x, t = probes((2, 8, 8)), torch.full((2,), T)
    with torch.no_grad():
        s_uc, s_c = score(x, T), score(x, T, torch.tensor([0, 2]))
        eps_uc = net(x, t, class_labels=torch.tensor([3, 3])).sample[:, :2]  # as DiTPipeline reads it
        eps_c = net(x, t, class_labels=torch.tensor([0, 2])).sample[:, :2]
    torch.testing.assert_close(s_uc, eps_score(eps_uc, score.schedule, T))
    torch.testing.assert_close(s_c, eps_score(eps_c, score.schedule, T))
    check_score(score, (2, 8, 8), device="cpu")
    check_score(score, (2, 8, 8), device="cpu", cond=torch.tensor([1, 1]))
    pipe = diffusers.DiTPipeline(transformer=net, vae=diffusers.AutoencoderKL(), scheduler=scheduler())
    assert find_score(Holder(pipeline=pipe)).model is net  # a pipeline's `.transformer`


def test_a_dit_in_a_user_score_without_its_class_label_names_the_label_not_the_shape():
    """The issue's second error: the shape is the config's own, the missing class label is the cause."""
    net = dit()
    user = DiffusionScore(net, NoiseSchedule.from_diffusers(scheduler()))
    with pytest.raises(MemwatchError) as info:
        check_score(user, (2, 8, 8), device="cpu")
    message = str(info.value)
    assert "takes `class_labels` in every call" in message and "cond_kwarg='class_labels'" in message
    assert "sample_shape" not in message


def test_a_shape_the_config_declares_is_never_blamed():
    broken = DiffusionScore(unet(), NoiseSchedule.from_diffusers(scheduler()), time_fn=lambda t: "not a time")
    with pytest.raises(MemwatchError, match=r"the shape its config declares.*The shape is not the cause"):
        check_score(broken, (3, 8, 8), device="cpu")
    with pytest.raises(MemwatchError, match=r"Pass the shape of one sample"):
        check_score(broken, (3, 5, 5), device="cpu")


def test_a_pixart_needs_the_empty_prompt_embedding_and_names_the_attribute():
    net, sched = pixart(), scheduler()
    score = find_score(Holder(transformer=net, scheduler=sched))
    assert isinstance(score, TransformerScore) and score.null_cond is None
    with pytest.raises(MemwatchError, match=r"PixArtTransformer2DModel takes a condition.*`memwatch_null_cond`.*empty"):
        check_score(score, (2, 8, 8), device="cpu")
    empty = torch.randn(3, 12, generator=torch.Generator().manual_seed(4))
    score = find_score(Holder(transformer=net, scheduler=sched, memwatch_null_cond=empty))
    check_score(score, (2, 8, 8), device="cpu")
    x = probes((2, 8, 8))
    with torch.no_grad():
        eps = net(x, encoder_hidden_states=empty.expand(2, 3, 12), timestep=torch.full((2,), T),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :2]  # fmt: skip
        torch.testing.assert_close(score(x, T), eps_score(eps, score.schedule, T))
    assert "(3, 12) like `null_cond`" in _error(score.conditional, x, T, torch.zeros(3, 16))
    without_null = find_score(Holder(transformer=net, scheduler=sched))  # only the network checks the width
    message = _error(without_null.conditional, x, T, torch.zeros(2, 3, 16))
    expected = "one prompt embedding [L, 12] per probe (`encoder_hidden_states`); got a torch.float32 condition"
    assert f"{expected} of per-probe shape (3, 16)" in message
    with pytest.raises(MemwatchError, match=r"`Holder.memwatch_null_cond`: `null_cond` must"):
        find_score(Holder(transformer=net, scheduler=sched, memwatch_null_cond="an empty prompt"))


def test_a_pixart_with_size_conditions_gets_the_image_size_in_pixels():
    net = pixart(use_additional_conditions=True, num_attention_heads=3, cross_attention_dim=24)  # sizes: width / 3
    empty = torch.randn(3, 12, generator=torch.Generator().manual_seed(4))
    score = find_score(Holder(transformer=net, scheduler=scheduler(), memwatch_null_cond=empty))
    x = probes((2, 8, 8))
    sizes = {"resolution": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    with torch.no_grad():  # PixArtAlphaPipeline's sizes: the image's pixels, the latent's × 8
        eps = net(x, encoder_hidden_states=empty.expand(2, 3, 12), timestep=torch.full((2,), T),
                  added_cond_kwargs=sizes).sample[:, :2]  # fmt: skip
        torch.testing.assert_close(score(x, T), eps_score(eps, score.schedule, T))


def _error(fn, *args):
    with pytest.raises(MemwatchError) as info:
        fn(*args)
    return str(info.value)


def _prompt(seed, tokens=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 12, generator=g), torch.randn(6, generator=g)


def test_sd3_takes_the_joint_condition_of_prompt_and_pooled_projection():
    net = sd3()
    empty, empty_pooled = _prompt(5)
    null = joint_condition(empty, empty_pooled)
    score = find_score(Holder(transformer=net, scheduler=scheduler(), memwatch_null_cond=null))
    assert isinstance(score, TransformerScore) and score.cond_shape == (3 * 12 + 6,)
    assert sample_shape_of(score) == (2, 8, 8)
    check_score(score, (2, 8, 8), device="cpu")
    x, (prompt, pooled) = probes((2, 8, 8)), _prompt(6)
    with torch.no_grad():
        eps = net(x, encoder_hidden_states=prompt.expand(2, 3, 12), pooled_projections=pooled.expand(2, 6),
                  timestep=torch.full((2,), T)).sample  # fmt: skip
        torch.testing.assert_close(score(x, T, joint_condition(prompt, pooled)), eps_score(eps, score.schedule, T))
    without_null = TransformerScore(net, score.schedule)  # only the network's E and P check the condition
    message = _error(without_null.conditional, x, T, torch.zeros(2, 40))
    assert "joint condition [L·E + P] per probe" in message and "[L, E=12]" in message and "[P=6]" in message
    assert "per-probe shape (40,)" in message
    _adjoint_consistent(score, x)


def test_flux_packs_the_latents_and_gives_ids_guidance_and_the_time_in_thousandths():
    net = flux()
    empty, empty_pooled = _prompt(5)
    null = joint_condition(empty, empty_pooled)
    score = find_score(Holder(transformer=net, scheduler=scheduler(), memwatch_null_cond=null))
    assert isinstance(score, TransformerScore) and sample_shape_of(score) is None  # H, W: from the batches
    check_score(score, (2, 4, 6), device="cpu")
    pipe = diffusers.FluxPipeline  # its own packing is the reference
    x = probes((2, 4, 6))
    with torch.no_grad():
        out = net(pipe._pack_latents(x, 2, 2, 4, 6), encoder_hidden_states=empty.expand(2, 3, 12),
                  pooled_projections=empty_pooled.expand(2, 6), timestep=torch.full((2,), T / 1000),
                  img_ids=pipe._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float32), txt_ids=torch.zeros(3, 3),
                  guidance=torch.full((2,), 3.5)).sample  # fmt: skip
        eps = pipe._unpack_latents(out, 4 * 8, 6 * 8, 8)
        torch.testing.assert_close(score(x, T), eps_score(eps, score.schedule, T))
    with pytest.raises(MemwatchError, match=r"C = in_channels / 4 = 2 and an even H and W; got .* \(2, 5, 6\)"):
        check_score(score, (2, 5, 6), device="cpu")
    with pytest.raises(MemwatchError, match=r"probes \[n, C, H, W\]; got probes of shape \(6, 8\)"):
        check_score(score, (6, 8), device="cpu")  # packed latents are not the probes
    _adjoint_consistent(score, x)
    unguided = Holder(transformer=flux(guidance_embeds=False), scheduler=scheduler(), memwatch_null_cond=null)
    check_score(find_score(unguided), (2, 4, 6), device="cpu")  # no `guidance` input


def _adjoint_consistent(score, x):
    """The sharpness' Jacobian products through the network pass the adjoint test."""
    from memwatch.operators import select_jvp_mode

    path = select_jvp_mode(lambda y: score(y, T), x, generator=torch.Generator().manual_seed(0))
    assert path.consistent, path.message


def test_a_transformer_keeps_its_call_convention_on_an_ema_copy():
    net = dit()
    averaged = torch.optim.swa_utils.AveragedModel(net)
    module = Holder(transformer=net, scheduler=scheduler(), ema=averaged)
    score = find_score(module, ema_attr="ema")
    with measured_score(score, module, "ema") as measured:
        assert isinstance(measured, TransformerScore) and measured.model is averaged.module
        assert measured.null_cond == score.null_cond
        check_score(measured, (2, 8, 8), device="cpu")


# ------------------------------------------------------------------------ EMA
def test_diffusers_ema_model_measures_the_shadow_weights_on_a_fresh_copy():
    net = unet()
    ema = diffusers.training_utils.EMAModel(net.parameters())  # shadows = the initial weights
    perturbed(net)  # training moved the network away from them
    module = Holder(unet=net, scheduler=scheduler(), ema=ema)
    score = find_score(module)
    before = params_of(net)
    x = probes((3, 8, 8))
    manual = copy.deepcopy(net)
    ema.copy_to(manual.parameters())
    with torch.no_grad(), measured_score(score, module, "ema") as measured:
        assert measured.model is not net and not measured.model.training
        value, raw, expected = measured(x, T), score(x, T), score.with_model(manual.eval())(x, T)
        copy_ref = weakref.ref(measured.model)
    assert torch.equal(value, expected) and not torch.allclose(value, raw, atol=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # training weights bit-identical
    assert net.training and all(p.requires_grad for p in net.parameters())
    del measured
    gc.collect()
    assert copy_ref() is None  # the copy is freed with the yielded score: memwatch keeps nothing
    # the shadow weights are copied again at every entry
    ema.step(net.parameters())
    with torch.no_grad(), measured_score(score, module, "ema") as measured:
        again = measured(x, T)
    ema.copy_to(manual.parameters())
    assert torch.equal(again, score.with_model(manual)(x, T)) and not torch.allclose(again, value, atol=1e-5)


def test_averaged_model_measures_its_module():
    net = unet()
    averaged = torch.optim.swa_utils.AveragedModel(net)
    perturbed(net)
    module = Holder(unet=net, scheduler=scheduler(), ema=averaged)
    score = find_score(module, ema_attr="ema")
    x = probes((3, 8, 8))
    with torch.no_grad(), measured_score(score, module, "ema") as measured:
        assert measured.model is averaged.module
        value, raw = measured(x, T), score(x, T)
    assert torch.equal(value, score.with_model(averaged.module)(x, T)) and not torch.allclose(value, raw, atol=1e-3)
    with measured_score(score, module, None) as same:
        assert same is score


def test_ema_of_the_whole_module_is_measured_at_the_network_path():
    module = Holder(unet=torch.compile(unet()), scheduler=scheduler())
    module.ema = torch.optim.swa_utils.AveragedModel(module)  # a deepcopy of the whole module
    score = find_score(module, ema_attr="ema")
    with measured_score(score, module, "ema") as measured:
        assert measured.model is module.ema.module.unet._orig_mod and measured.model is not score.model


def test_wrong_ema_attr_says_what_it_found():
    net = unet()
    module = Holder(unet=net, scheduler=scheduler(), ema_unet=diffusers.training_utils.EMAModel(net.parameters()))
    score = find_score(module)
    with pytest.raises(MemwatchError, match=r"`ema_attr`='nope' names no attribute.*ema_unet \(EMAModel\)"):
        with measured_score(score, module, "nope"):
            pass
    module.step_size = 0.1
    with pytest.raises(MemwatchError, match=r"`ema_attr`='step_size' names a float"):
        with measured_score(score, module, "step_size"):
            pass
    module.whole = diffusers.training_utils.EMAModel([*net.parameters(), nn.Parameter(torch.zeros(3))])
    with pytest.raises(MemwatchError, match=r"EMAModel of \d+ parameters that do not match"):
        with measured_score(score, module, "whole"):
            pass
    module.other = torch.optim.swa_utils.AveragedModel(cond_unet())
    with pytest.raises(MemwatchError, match=r"holding a UNet2DConditionModel, but the measured network is a UNet2DM"):
        with measured_score(score, module, "other"):
            pass
    module.smaller = torch.optim.swa_utils.AveragedModel(unet(num_class_embeds=3))
    with pytest.raises(MemwatchError, match=r"parameter shapes"):
        with measured_score(score, module, "smaller"):
            pass
    lambda_score = DiffusionScore(lambda x, t: net(x, t).sample, score.schedule)
    with pytest.raises(MemwatchError, match=r"not the nn.Module whose parameters it shadows"):
        with measured_score(lambda_score, module, "ema_unet"):
            pass


# ------------------------------------------------------------------------ probe shape
def test_sample_shape_of_a_config():
    assert sample_shape_of(DiffusionScore(unet(sample_size=(8, 16)), NoiseSchedule.linear(10))) == (3, 8, 16)
    assert sample_shape_of(DiffusionScore(lambda x, t: x, NoiseSchedule.linear(10))) is None


# ------------------------------------------------------------------------ dry call
def test_check_score_names_a_sample_shape_the_model_cannot_take():
    net = unet()
    score = find_score(Holder(unet=net, scheduler=scheduler()))
    before = params_of(net)
    with pytest.raises(MemwatchError) as info:
        check_score(score, (4, 8, 8), device="cpu")
    message = str(info.value)
    assert "`data.sample_shape`=(4, 8, 8)" in message and "UNet2DModel" in message and "to have 3 channels" in message
    assert net.training and all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(MemwatchError, match=r"`sample_shape` must be a non-empty shape of positive sizes"):
        check_score(score, (3, 0, 8), device="cpu")


def test_check_score_names_a_model_whose_output_is_not_shaped_like_its_input():
    score = find_score(Holder(unet=unet(out_channels=6), scheduler=scheduler()))  # learned variance: 2C channels
    with pytest.raises(MemwatchError, match=r"UNet2DModel\) does not return a tensor shaped like its input.*"):
        check_score(score, (3, 8, 8), device="cpu")
    with pytest.raises(MemwatchError, match=r"in_channels=3, out_channels=6.*first 3 output channels"):
        check_score(score, (3, 8, 8), device="cpu")
    odd = DiffusionScore(lambda x, t: {"eps": x}, score.schedule)
    with pytest.raises(MemwatchError, match=r"function\) does not return a tensor.*got dict"):
        check_score(odd, (3, 8, 8), device="cpu")


def test_check_score_runs_the_score_itself_and_keeps_memwatch_errors():
    class Halved(DiffusionScore):
        def __call__(self, x, t, cond=None):
            return super().__call__(x, t, cond) * float("nan")  # a subclass: its own __call__ is what is checked

    score = find_score(Holder(unet=cond_unet(), scheduler=scheduler()))
    halved = Halved(score.model, score.schedule, cond_kwarg="encoder_hidden_states")
    emb = torch.zeros(1, 5, 16)
    with pytest.warns(RuntimeWarning, match="not finite"):
        check_score(halved, (4, 8, 8), device="cpu", cond=emb)
    with pytest.raises(MemwatchError, match=r"`cond` must be .* batch size 1 or 2"):
        check_score(score, (4, 8, 8), device="cpu", cond=torch.zeros(3, 5, 16))


def test_check_score_warns_about_a_non_finite_score():
    # NaN weights are a state of training, not a configuration error: the checks report NaN
    with pytest.warns(RuntimeWarning, match="not finite"):
        check_score(DiffusionScore(lambda x, t: x * float("nan"), NoiseSchedule.linear(10)), (2,), device="cpu")


# ------------------------------------------------------------------------ in a real fit
class LazyUNet(pl.LightningModule):
    """A DDPM whose network is built in ``configure_model`` (after ``setup``), as large models do."""

    def configure_model(self):
        if not hasattr(self, "unet"):
            self.unet, self.scheduler = torch.compile(unet()), scheduler()

    def training_step(self, batch, batch_idx):
        x = batch[0]
        noise = torch.randn_like(x)
        t = torch.randint(0, 100, (x.shape[0],), device=x.device)
        pred = self.unet(self.scheduler.add_noise(x, noise, t), t).sample
        return nn.functional.mse_loss(pred, noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class Discover(pl.Callback):
    """Discovery at the points a monitor would run it: ``setup`` and ``on_fit_start``."""

    def setup(self, trainer, pl_module, stage):
        with pytest.raises(MemwatchError, match="no diffusers network"):
            find_score(pl_module)  # configure_model has not run yet

    def on_fit_start(self, trainer, pl_module):
        self.score = find_score(pl_module)
        self.shape = sample_shape_of(self.score)
        check_score(self.score, self.shape, device=pl_module.device)


def test_discovery_at_fit_start_sees_a_network_built_in_configure_model(tmp_path):
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    callback, module = Discover(), LazyUNet()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # the compiled forward is never called: measure-only discovery; train eagerly through the same weights
    with torch._dynamo.config.patch(disable=True):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert callback.score.model is module.unet._orig_mod and callback.shape == (3, 8, 8)


def test_diffusers_score_reads_a_network_and_its_scheduler_held_apart_as_find_score_reads_the_pair():
    net, sched = unet(), scheduler(prediction_type="v_prediction")
    apart, found = diffusers_score(net, sched), find_score(Holder(unet=net, scheduler=sched))
    x, t = torch.randn(2, 3, 8, 8), torch.full((2,), T)
    assert apart.model is net and (apart.prediction, apart.schedule.kind) == ("v_prediction", found.schedule.kind)
    torch.testing.assert_close(apart(x, t), found(x, t), rtol=0, atol=0)
    with pytest.raises(MemwatchError, match=r"`network` must be a diffusers UNet .* got Linear"):
        diffusers_score(nn.Linear(2, 2), sched)
    with pytest.raises(MemwatchError, match=r"the scheduler `noise_scheduler` has config.prediction_type='bogus'"):
        diffusers_score(net, scheduler(prediction_type="bogus"), names=("noise_scheduler", "null_cond"))
