"""memwatch.conditional: Jeon et al.'s and Wen et al.'s metrics against dense float64 references,
the digits setting of ``examples/conditional.py``, input checks, and the callback's per-condition
logging (one short real ``Trainer.fit``)."""

from __future__ import annotations

import csv
import importlib.util
import math
import time
from pathlib import Path

import pytest
import torch
from callback_setup import memorizing_data, module_2d, trainer
from lightning.pytorch.loggers import CSVLogger
from sklearn.metrics import roc_auc_score

from memwatch.apps.toymodels import MLPDenoiser, TensorDataModule
from memwatch.callback import MemorizationMonitor
from memwatch.conditional import (
    check_first_steps,
    condition_keys,
    conditional_metrics,
    default_first_steps,
    hessian_score_difference,
    parse_conditions,
    product_step_indices,
)
from memwatch.operators import reference_jacobian
from memwatch.sampling import sample_trajectory
from memwatch.schedules import NoiseSchedule
from memwatch.score import DiffusionScore, broadcast_condition
from memwatch.sharpness import SharpnessOptions, measure_sharpness

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "conditional.py"
SCHED = NoiseSchedule.linear(100)
NUM_CLASSES = 3


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def small_score() -> DiffusionScore:
    """A random class-conditional MLP in float64 (its Jacobians are not symmetric)."""
    torch.manual_seed(0)
    net = MLPDenoiser((3,), hidden=16, depth=1, time_dim=8, num_classes=NUM_CLASSES).double()
    return DiffusionScore(net, SCHED, prediction="epsilon", null_cond=torch.tensor(NUM_CLASSES))


def _dense(score: DiffusionScore, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, symmetric: bool):
    """``s_Δ`` and ``(H_c − H_uc) s_Δ`` per sample from dense ``jacfwd`` Jacobians of s_c and s_uc."""
    deltas, products = [], []
    for i in range(x.shape[0]):
        xi, ti, ci = x[i : i + 1], t[i : i + 1], cond[i : i + 1]
        h_c = reference_jacobian(lambda z, ti=ti, ci=ci: score.conditional(z, ti, ci), xi)[0]
        h_uc = reference_jacobian(lambda z, ti=ti: score.unconditional(z, ti), xi)[0]
        if symmetric:
            h_c, h_uc = (h_c + h_c.T) / 2, (h_uc + h_uc.T) / 2
        s_delta = (score.conditional(xi, ti, ci) - score.unconditional(xi, ti)).reshape(-1).detach()
        deltas.append(s_delta)
        products.append(h_c @ s_delta - h_uc @ s_delta)
    return torch.stack(deltas), torch.stack(products)


# ------------------------------------------------------------------------ (a) dense references
@pytest.mark.parametrize("jvp_mode", ["forward", "reverse"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_hessian_score_difference_matches_dense_jacobians(small_score, symmetric, jvp_mode):
    x = torch.randn(5, 3, generator=_gen(1), dtype=torch.float64)
    t = torch.tensor([5, 20, 40, 70, 99])
    cond = torch.tensor([0, 1, 2, 1, 0])
    s_delta, product = hessian_score_difference(small_score, x, t, cond, symmetric=symmetric, jvp_mode=jvp_mode)
    ref_delta, ref_product = _dense(small_score, x, t, cond, symmetric)
    assert s_delta.dtype == product.dtype == torch.float64 and product.shape == x.shape
    torch.testing.assert_close(s_delta, ref_delta, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(product, ref_product, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_central_difference_product_matches_dense_jacobians(small_score, symmetric):
    """``jvp_mode="fd"`` (forward passes only: the cheap product on a UNet, see the README's cost table)
    within its O(h²) + O(ε/h) error of the dense reference in float64."""
    x = torch.randn(5, 3, generator=_gen(1), dtype=torch.float64)
    t = torch.tensor([5, 20, 40, 70, 99])
    cond = torch.tensor([0, 1, 2, 1, 0])
    _, product = hessian_score_difference(small_score, x, t, cond, symmetric=symmetric, jvp_mode="fd")
    _, ref_product = _dense(small_score, x, t, cond, symmetric)
    torch.testing.assert_close(product, ref_product, rtol=1e-6, atol=1e-8)


def test_symmetrizing_matters_for_a_learned_score(small_score):
    x = torch.randn(4, 3, generator=_gen(2), dtype=torch.float64)
    _, sym = hessian_score_difference(small_score, x, 30, 1, symmetric=True)
    _, plain = hessian_score_difference(small_score, x, 30, 1, symmetric=False)
    assert (sym - plain).norm() > 1e-3 * plain.norm()


def test_metrics_average_the_first_steps_of_the_probe_trajectory(small_score):
    noise = torch.randn(4, 3, generator=_gen(3), dtype=torch.float64)
    cond = torch.tensor([2, 0, 1, 2])
    res = conditional_metrics(
        small_score, cond, noise=noise, steps=10, first_steps=4, eval_t=30, k=2, dtype=torch.float64
    )
    grid = SCHED.sampling_timesteps(10)
    torch.testing.assert_close(res.timesteps, grid[:4])
    traj = sample_trajectory(
        small_score, noise=noise, steps=10, cond=cond, states_at=[*grid[:4].tolist(), 30], dtype=torch.float64
    )
    for i, t in enumerate(grid[:4].tolist()):
        ref_delta, ref_product = _dense(small_score, traj.states[float(t)], torch.full((4,), t), cond, True)
        torch.testing.assert_close(res.step_score_diff_norm[:, i], ref_delta.norm(dim=1), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            res.step_hessian_score_diff_norm[:, i], ref_product.norm(dim=1), rtol=1e-9, atol=1e-12
        )
    torch.testing.assert_close(res.score_diff_norm, res.step_score_diff_norm.mean(1))
    torch.testing.assert_close(res.hessian_score_diff_norm, res.step_hessian_score_diff_norm.mean(1))
    sharp = measure_sharpness(small_score, traj.states[30.0], 30, k=2, cond=cond)
    torch.testing.assert_close(res.sharpness.eigenvalues, sharp.eigenvalues)
    torch.testing.assert_close(res.sharp_fraction, sharp.sharp_fraction)
    torch.testing.assert_close(res.samples, traj.samples)
    assert res.finite.all() and res.symmetric


def test_product_steps_measure_a_stratified_subset_of_the_window(small_score):
    """``product_steps=k``: the same per-step values as every step, at the middle step of each of k equal
    parts of the window, against the dense reference at those states; the mean is over those k steps."""
    noise = torch.randn(4, 3, generator=_gen(5), dtype=torch.float64)
    cond = torch.tensor([0, 1, 2, 1])
    kwargs = dict(noise=noise, steps=10, first_steps=6, dtype=torch.float64)
    every = conditional_metrics(small_score, cond, **kwargs)
    some = conditional_metrics(small_score, cond, product_steps=3, **kwargs)
    idx = product_step_indices(6, 3)
    assert idx == [1, 3, 5] and product_step_indices(6, 6) == list(range(6))
    torch.testing.assert_close(some.timesteps, every.timesteps[idx])
    torch.testing.assert_close(some.step_score_diff_norm, every.step_score_diff_norm[:, idx])
    torch.testing.assert_close(some.step_hessian_score_diff_norm, every.step_hessian_score_diff_norm[:, idx])
    torch.testing.assert_close(some.hessian_score_diff_norm, some.step_hessian_score_diff_norm.mean(1))
    torch.testing.assert_close(some.samples, every.samples)
    t = float(some.timesteps[1])
    traj = sample_trajectory(small_score, noise=noise, steps=10, cond=cond, states_at=[t], dtype=torch.float64)
    ref_delta, ref_product = _dense(small_score, traj.states[t], torch.full((4,), t), cond, True)
    torch.testing.assert_close(some.step_score_diff_norm[:, 1], ref_delta.norm(dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(some.step_hessian_score_diff_norm[:, 1], ref_product.norm(dim=1), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"`product_steps` must be an integer in \[1, first_steps=6\]"):
        conditional_metrics(small_score, cond, product_steps=7, **kwargs)


def test_one_condition_for_all_probes_equals_per_probe_conditions_and_chunks(small_score):
    kwargs = dict(n=6, shape=(3,), steps=8, first_steps=3, dtype=torch.float64)
    one = conditional_metrics(small_score, 1, generator=_gen(4), **kwargs)
    labels = torch.ones(6, dtype=torch.long)
    per_probe = conditional_metrics(small_score, labels, generator=_gen(4), max_batch=4, **kwargs)
    torch.testing.assert_close(one.hessian_score_diff_norm, per_probe.hessian_score_diff_norm)
    torch.testing.assert_close(one.score_diff_norm, per_probe.score_diff_norm)
    assert one.sharpness is None and one.sharp_fraction is None
    assert default_first_steps(8) == 6
    default = conditional_metrics(small_score, 1, generator=_gen(4), **dict(kwargs, first_steps=None))
    assert default.timesteps.numel() == 6


# ------------------------------------------------------------------------ memory: max_batch
class _RowLimited(torch.nn.Module):
    """The wrapped network, raising when a call carries more than ``limit`` rows."""

    def __init__(self, net: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.net, self.limit, self.calls = net, limit, 0

    def forward(self, x, t, cond=None):
        if x.shape[0] > self.limit:
            raise RuntimeError(f"{x.shape[0]} rows in one call, more than {self.limit}")
        self.calls += 1
        return self.net(x, t, cond)


def _fields(res):
    out = {name: getattr(res, name) for name in ("score_diff_norm", "hessian_score_diff_norm", "samples", "finite")}
    out |= {"step_hsd": res.step_hessian_score_diff_norm, "sharp": res.sharp_fraction}
    if res.sharpness is not None:
        out |= {"eig": res.sharpness.eigenvalues, "trace": res.sharpness.trace}
    return out


@pytest.mark.parametrize("method", ["dense", "lanczos"])
def test_every_model_call_is_bounded_by_max_batch_and_results_do_not_change(small_score, method):
    """16 probes × 3 conditions = 48 probes, 4 steps each (192 product rows): with max_batch=8 a
    network that fails above 8 rows goes through sampling, products and sharpness; without, it fails."""
    guided = DiffusionScore(small_score.model, SCHED, null_cond=small_score.null_cond, guidance_scale=2.0)
    limited = guided.with_model(_RowLimited(small_score.model, 8))
    noise = torch.randn(16, 3, generator=_gen(5), dtype=torch.float64).repeat(3, 1)
    labels = torch.arange(3).repeat_interleave(16)
    kwargs = dict(noise=noise, steps=6, first_steps=4, eval_t=30, dtype=torch.float64)
    options = SharpnessOptions(k=2, method=method, num_iters=3, num_vectors=4)

    def run(score, max_batch):
        return conditional_metrics(
            score, labels, options=options.replace(max_batch=max_batch), lanczos_generator=_gen(6), **kwargs
        )

    full = run(guided, None)
    bounded = run(limited, 8)
    assert limited.model.calls > 0
    for name, value in _fields(full).items():
        torch.testing.assert_close(_fields(bounded)[name], value, rtol=1e-10, atol=1e-12, msg=name)
    if method == "dense":
        odd = run(guided, 5)  # a chunk size that divides neither 48 nor 192
        for name, value in _fields(full).items():
            torch.testing.assert_close(_fields(odd)[name], value, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="more than 8"):
        run(limited, None)


def test_hessian_score_difference_in_chunks_equals_one_call(small_score):
    x = torch.randn(7, 3, generator=_gen(7), dtype=torch.float64)
    t, cond = torch.tensor([5, 20, 40, 70, 99, 3, 50]), torch.tensor([0, 1, 2, 1, 0, 2, 2])
    whole = hessian_score_difference(small_score, x, t, cond)
    limited = small_score.with_model(_RowLimited(small_score.model, 3))
    chunks = hessian_score_difference(limited, x, t, cond, max_batch=3)
    for a, b in zip(whole, chunks):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="`max_batch` must be a positive integer"):
        hessian_score_difference(small_score, x, t, cond, max_batch=0)


def test_options_and_keyword_settings_are_the_same(small_score):
    kwargs = dict(n=4, shape=(3,), steps=5, first_steps=2, eval_t=30, dtype=torch.float64)
    a = conditional_metrics(small_score, 1, generator=_gen(8), options=SharpnessOptions(k=2, method="dense"), **kwargs)
    b = conditional_metrics(small_score, 1, generator=_gen(8), k=2, method="dense", **kwargs)
    c = conditional_metrics(
        small_score, 1, generator=_gen(8), options=SharpnessOptions(k=5), k=2, method="dense", **kwargs
    )
    for other in (b, c):
        torch.testing.assert_close(other.sharpness.eigenvalues, a.sharpness.eigenvalues)
        torch.testing.assert_close(other.hessian_score_diff_norm, a.hessian_score_diff_norm)
    assert a.sharpness.eigenvalues.shape == (4, 2)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['num_probes'\]; .* 'max_batch'"):
        conditional_metrics(small_score, 1, num_probes=3, **kwargs)
    with pytest.raises(ValueError, match="`options` must be a SharpnessOptions or None, got dict"):
        conditional_metrics(small_score, 1, options={"k": 2}, **kwargs)
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, d=3\]"):
        conditional_metrics(small_score, 1, k=4, **kwargs)


# ------------------------------------------------------------------------ conditions to watch
def test_parse_conditions_names_tensors_sequences_and_mappings():
    assert list(parse_conditions(torch.tensor([3, 1, 7]))) == ["3", "1", "7"]
    assert list(parse_conditions([2, torch.tensor(5)])) == ["2", "5"]
    emb = torch.randn(3, 4, 16, generator=_gen(9))
    by_index = parse_conditions(emb)
    assert list(by_index) == ["0", "1", "2"] and all(v.shape == (4, 16) for v in by_index.values())
    torch.testing.assert_close(torch.stack(list(by_index.values())), emb)
    prompts = {"a photo of digit 0": emb[0], "a photo of digit 1": emb[1][None]}
    named = parse_conditions(prompts, null_cond_shape=(4, 16))
    assert list(named) == list(prompts) and named["a photo of digit 1"].shape == (4, 16)
    assert parse_conditions(None) == {}
    assert list(parse_conditions({1: 1, 2: 2})) == ["1", "2"]
    assert parse_conditions(torch.arange(2), null_cond_shape=()).keys() == {"0", "1"}


@pytest.mark.parametrize(
    "conditions, shape, match",
    [
        (
            torch.zeros(4, 16),
            (4, 16),
            r"`conditions` must be a tensor \[C, 4, 16\] .* shape \(4, 16\); this is one "
            r"condition: pass conditions\[None\]",
        ),
        (torch.zeros(2, 4, 8), (4, 16), r"`conditions` must be a tensor \[C, 4, 16\] .* got .* shape \(2, 4, 8\)"),
        (
            {"a": torch.zeros(4, 8)},
            (4, 16),
            r"`conditions\['a'\]` must have the shape of one condition, \(4, 16\) .* "
            r"got shape \(4, 8\)",
        ),
        ([torch.zeros(2, 4, 16)], (4, 16), r"`conditions\[0\]` must have the shape .* got shape \(2, 4, 16\)"),
        ({}, None, "`conditions` must be None, a tensor .* or a non-empty mapping name -> condition, got dict"),
        ({(1, 2): 1}, None, r"`conditions` keys must be names \(str\), got tuple"),
        ({"a": 1, "b": torch.zeros(2)}, None, r"`conditions` must all have the same shape and kind"),
        ([1, torch.tensor(1.0)], None, r"`conditions` must all have the same shape and kind"),
        ({"1": 0, 1: 2}, None, r"`conditions` must not repeat a name, got \['1', '1'\]"),
        (
            {"a": torch.tensor(True)},
            None,
            r"`conditions\['a'\]` must be an int label or a torch.Tensor, got a torch.bool",
        ),
        ([torch.full((2,), float("nan"))], None, r"`conditions\[0\]` must be finite"),
        (torch.zeros(3, 1), (), r"`conditions` must be a tensor \[C\]"),
    ],
)
def test_parse_conditions_names_the_bad_condition(conditions, shape, match):
    with pytest.raises(ValueError, match=match):
        parse_conditions(conditions, null_cond_shape=shape)


def test_check_first_steps_and_condition_keys():
    assert check_first_steps(None, 20) == default_first_steps(20) == 16
    assert check_first_steps(20, 20) == 20
    with pytest.raises(ValueError, match=r"`condition_first_steps` must be an integer in \[1, sampler_steps=50\]"):
        check_first_steps(51, 50, name="condition_first_steps", steps_name="sampler_steps")
    with pytest.raises(ValueError, match="`first_steps`"):
        check_first_steps(True, 5)
    keys = condition_keys(["a photo of digit 0", "a photo/of digit 0", "!!", "x" * 100, "x" * 101])
    assert list(keys.values()) == ["a_photo_of_digit_0", "a_photo_of_digit_0_1", "condition", "x" * 64, "x" * 62 + "_4"]


def test_one_text_embedding_for_all_probes_when_tokens_equal_probes():
    """``null_cond`` ``[L, E]`` with ``L == n``: a ``cond`` ``[L, E]`` is one prompt, not ``n`` conditions."""
    torch.manual_seed(1)
    net = MLPDenoiser((3,), hidden=16, depth=1, time_dim=8).double()
    proj = torch.nn.Linear(5, 16, dtype=torch.float64)

    class TextMLP(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            assert encoder_hidden_states.shape == (x.shape[0], 4, 5)
            return net(x, t) + 0.1 * proj(encoder_hidden_states.mean(1))[:, :3]

    score = DiffusionScore(
        TextMLP(), SCHED, null_cond=torch.zeros(4, 5, dtype=torch.float64), cond_kwarg="encoder_hidden_states"
    )
    prompt = torch.randn(4, 5, generator=_gen(10), dtype=torch.float64)
    kwargs = dict(n=4, shape=(3,), steps=5, first_steps=3, dtype=torch.float64)
    one = conditional_metrics(score, prompt, generator=_gen(11), **kwargs)
    per_probe = conditional_metrics(score, prompt.expand(4, 4, 5), generator=_gen(11), max_batch=3, **kwargs)
    torch.testing.assert_close(one.hessian_score_diff_norm, per_probe.hessian_score_diff_norm)
    assert bool((one.score_diff_norm > 0).all())


# ------------------------------------------------------------------------ (b) the digits example
def _load_example():
    spec = importlib.util.spec_from_file_location("memwatch_example_conditional", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The example's setting (class 3 = one image × 100), trained once: 3000 steps, 32 probes per class."""
    example = _load_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is several times faster than two
    try:
        started = time.perf_counter()
        images, labels, _ = example.duplicated_class_digits(dup_class=3, copies=100)
        module = example.train(images, labels, 3000, root=tmp_path_factory.mktemp("digits"), seed=0)
        trained = time.perf_counter() - started
        result, probe_labels = example.measure(module, n=32, steps=20, sigma=0.2, seed=0)
        print(f"digits: trained in {trained:.1f} s, measured in {time.perf_counter() - started - trained:.1f} s")
    finally:
        torch.set_num_threads(threads)
    return example, result, probe_labels


def test_the_duplicated_class_stands_out(digits_run):
    example, result, labels = digits_run
    summary = example.per_class(result, labels)
    others = torch.arange(10) != 3
    positive = (labels == 3).numpy()
    for name, values, margin in (
        ("hessian_score_diff", result.hessian_score_diff_norm, 1.2),  # ratio to the next class
        ("sharp_fraction_mean", result.sharp_fraction, 1.05),  # sharp fraction at σ_t = 0.2
    ):
        means = summary[name][0]
        assert means[3] > margin * means[others].max(), (name, means.tolist())
        assert roc_auc_score(positive, values.numpy()) >= 0.9, name
    assert int(summary["hessian_score_diff"][0].argmax()) == 3
    assert result.finite.all()


# ------------------------------------------------------------------------ (c) input checks
@pytest.mark.parametrize(
    "cond, match",
    [
        ("three", r"`cond` must be a torch.Tensor .* or an int class label, got str"),
        (3.0, r"`cond` must be .* got float"),
        (True, r"`cond` must be .* got bool"),
        (torch.tensor([0, 1, 2]), r"`cond` must be .* batch size 1 or 4 .* got shape \(3,\)"),
        (torch.tensor(7), r"the model failed on `cond`.*IndexError"),
        # the shape of one condition is that of null_cond (0-d): [4, 5] is caught before the model
        (torch.zeros(4, 5, dtype=torch.long), r"`cond` must be one condition of shape \(\) .* got shape \(4, 5\)"),
        (torch.zeros(()), r"`cond` must be integer \(a label\) like `null_cond`"),
    ],
)
def test_a_bad_condition_is_named_in_the_error(small_score, cond, match):
    with pytest.raises(ValueError, match=match):
        conditional_metrics(small_score, cond, n=4, shape=(3,), steps=5, first_steps=2, dtype=torch.float64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(first_steps=0), "`first_steps` must be an integer in \\[1, steps=5\\]"),
        (dict(first_steps=6), "`first_steps`"),
        (dict(steps=0), "`steps` must be a positive integer"),
        (dict(n=None), "pass `noise`, or both `n` and `shape`"),
        (dict(eval_t=500), "`eval_t` must lie in"),
        (dict(jvp_mode="central"), "`jvp_mode`"),
    ],
)
def test_bad_arguments_are_named(small_score, kwargs, match):
    args = dict(n=4, shape=(3,), steps=5, first_steps=2, dtype=torch.float64) | kwargs
    with pytest.raises(ValueError, match=match):
        conditional_metrics(small_score, 1, **args)


def test_broadcast_condition_and_hessian_score_difference_validate():
    assert broadcast_condition(torch.zeros(1, 7, 2), 3).shape == (3, 7, 2)
    with pytest.raises(ValueError, match="`x` must be a floating tensor"):
        hessian_score_difference(DiffusionScore(lambda x, t, c=None: x, SCHED), torch.ones(3, dtype=torch.long), 5, 1)
    with pytest.raises(ValueError, match="`score` must be a memwatch.DiffusionScore"):
        conditional_metrics(lambda x, t: x, 1, n=2, shape=(3,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(conditions="0123"), "`conditions` must be None, a tensor"),
        (dict(conditions=torch.tensor(3)), r"`conditions` must be a tensor \[C, \.\.\.\]"),
        (dict(conditions=torch.zeros(0, dtype=torch.long)), r"`conditions` must be a tensor \[C"),
        (dict(conditions=[0, True]), r"`conditions\[1\]` must be an int label or a torch.Tensor, got bool"),
        (dict(conditions=[torch.zeros(2), torch.zeros(3)]), "`conditions` must all have the same shape"),
        (dict(conditions=[1, 1]), "`conditions` must not repeat a label"),
        (dict(conditions=[0, 1], condition_first_steps=0), "`probes.condition_first_steps`"),
        (dict(conditions=[0, 1], condition_first_steps=51), r"`probes.condition_first_steps` .*sampler_steps=50"),
    ],
)
def test_bad_conditions_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorizationMonitor(**kwargs)


# ------------------------------------------------------------------------ (d) the callback
def test_callback_logs_per_condition_metrics_table_and_chart(tmp_path):
    import lightning.pytorch as pl

    x = memorizing_data().repeat(8, 1)  # four corners, one class each (class 3: the corner (-1, -1))
    y = torch.arange(4).repeat(8)
    logger = CSVLogger(tmp_path, name="csv")
    monitor = MemorizationMonitor(
        every_n_train_steps=10,
        num_probes=4,
        sampler_steps=6,
        sigmas=(0.2,),
        k=2,
        conditions=torch.arange(4),
        verbose=False,
        raise_errors=True,
        save_clean_checkpoint=False,
    )
    pl.seed_everything(0, verbose=False)
    module = module_2d(hidden=32, depth=1, num_classes=4)
    trainer(tmp_path, [monitor], max_steps=20, logger=logger).fit(module, TensorDataModule(x, y, batch_size=32))

    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = [r for r in rows if r.get("memwatch/most_memorized_condition")]
    assert [int(r["step"]) for r in logged] == [10, 20]
    for c in range(4):
        for name in ("hessian_score_diff", "score_diff", "sharp_fraction_mean"):
            assert math.isfinite(float(logged[-1][f"memwatch/cond/{c}/{name}"])), (c, name)
    flagged = int(float(logged[-1]["memwatch/most_memorized_condition"]))
    with open(Path(logger.log_dir) / "memwatch" / "conditions_step20.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["condition"] for r in table] == ["0", "1", "2", "3"]
    assert [r["most_memorized"] for r in table].count("True") == 1 and table[flagged]["most_memorized"] == "True"
    best = max(table, key=lambda r: float(r["hessian_score_diff"]))
    assert best["condition"] == str(flagged)
    assert Path(logger.log_dir, "memwatch", "conditions_step20.png").exists()
    last = monitor.history[-1]
    assert last["most_memorized_condition"] == flagged and "cond/0/score_diff" in last
    assert "memwatch/sharp_fraction_mean" in logged[-1]  # the unconditional metrics are still there
