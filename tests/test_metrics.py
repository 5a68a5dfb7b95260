"""Tests for memwatch.metrics: values by hand, AUROC against sklearn, resets, "cat" sync."""

import math
import warnings

import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.utilities.data import dim_zero_cat

from memwatch.metrics import MemorizationMetrics, memorization_metrics

KEYS = {"sharp_fraction_mean", "lid_mean", "lambda_min", "normalized_eig_mean", "memorized_fraction", "nonfinite_count"}
NN_KEYS = KEYS | {"nn_memorized_fraction", "auroc", "flagged_fraction"}


def _probes(n, seed=0, nn=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    d = {
        "sharp_fraction": torch.rand(n, generator=g, dtype=dtype),
        "lid": 10 * torch.rand(n, generator=g, dtype=dtype),
        "lambda_min": -100 * torch.rand(n, generator=g, dtype=dtype),
        "normalized_mean": -torch.rand(n, generator=g, dtype=dtype),
        "score": torch.rand(n, generator=g, dtype=dtype),
    }
    if nn:
        d["nn_ratio"] = torch.rand(n, generator=g, dtype=dtype)
    return d


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], equal_nan=True, msg=k)


def test_values_by_hand():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    out = memorization_metrics(
        sharp_fraction=t(1.0, 0.5, 0.0, 0.25),
        lid=t(0.0, 4.0, 8.0, 6.0),
        lambda_min=t(-9.0, -3.0, -1.0, -2.0),
        normalized_mean=t(-1.0, -0.5, 0.0, -0.3),
        score=t(0.9, 0.5, 0.1, 0.7),
        nn_ratio=t(0.1, 0.5, 0.9, 0.3),
    )
    assert set(out) == NN_KEYS
    assert out["sharp_fraction_mean"].item() == pytest.approx(1.75 / 4)
    assert out["lid_mean"].item() == pytest.approx(18 / 4)
    assert out["lambda_min"].item() == -9.0
    assert out["normalized_eig_mean"].item() == pytest.approx(-1.8 / 4)
    assert out["memorized_fraction"].item() == pytest.approx(2 / 4)  # 0.5 is not > 0.5
    assert out["nn_memorized_fraction"].item() == pytest.approx(2 / 4)  # 0.1 and 0.3 < 1/3
    # positives {0.9, 0.7} vs negatives {0.5, 0.1}: every pair ordered
    assert out["auroc"].item() == pytest.approx(1.0)
    assert out["nonfinite_count"].item() == 0
    assert all(v.ndim == 0 and v.is_floating_point() for v in out.values())


def test_flagged_fraction_counts_a_probe_that_is_sharp_or_a_copy_once():
    d = _probes(4, nn=False)
    score, nn = torch.tensor([0.9, 0.9, 0.1, 0.1]), torch.tensor([0.1, 0.9, 0.1, 0.9])  # both, sharp, copy, neither
    out = memorization_metrics(**{**d, "score": score}, nn_ratio=nn, score_threshold=0.5)
    assert out["memorized_fraction"].item() == pytest.approx(2 / 4)
    assert out["nn_memorized_fraction"].item() == pytest.approx(2 / 4)
    assert out["flagged_fraction"].item() == pytest.approx(3 / 4)


def test_thresholds_and_no_nn_ratio():
    d = _probes(7, nn=False)
    out = memorization_metrics(**d, score_threshold=0.3)
    assert set(out) == KEYS
    assert out["memorized_fraction"].item() == pytest.approx((d["score"] > 0.3).double().mean().item())


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_auroc_matches_sklearn(scale):
    d = _probes(40, seed=3)
    # scores outside [0, 1] (and large ones that a sigmoid would saturate) must keep their order
    d["score"] = scale * (d["score"] - 0.5) + 0.2 * d["nn_ratio"]
    out = memorization_metrics(**d, nn_threshold=0.4)
    labels = (d["nn_ratio"] < 0.4).numpy()
    assert 0 < labels.sum() < len(labels)
    assert out["auroc"].item() == pytest.approx(roc_auc_score(labels, d["score"].numpy()), abs=1e-6)


def test_auroc_with_ties_matches_sklearn():
    score = torch.tensor([0.2, 0.2, 0.5, 0.5, 0.9, 0.1])
    nn = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.1, 0.9])
    z = torch.zeros(6)
    out = memorization_metrics(z, z, z, z, score, nn)
    assert out["auroc"].item() == pytest.approx(roc_auc_score((nn < 1 / 3).numpy(), score.numpy()), abs=1e-6)


@pytest.mark.parametrize("nn_value", [0.1, 0.9])
def test_auroc_single_class_is_nan_without_warning(nn_value):
    d = _probes(5, nn=True)
    d["nn_ratio"] = torch.full((5,), nn_value, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = memorization_metrics(**d)
    assert math.isnan(out["auroc"].item())
    assert out["nn_memorized_fraction"].item() == (1.0 if nn_value < 1 / 3 else 0.0)


def test_nonfinite_probes_are_dropped_and_counted():
    d = _probes(6)
    d["lid"][1] = float("nan")
    d["score"][4] = float("inf")
    d["nn_ratio"][5] = float("nan")
    out = memorization_metrics(**d)
    keep = torch.tensor([True, False, True, True, False, False])
    ref = memorization_metrics(**{k: v[keep] for k, v in d.items()})
    assert out["nonfinite_count"].item() == 3
    ref["nonfinite_count"] = out["nonfinite_count"]
    _assert_same(out, ref)
    assert all(math.isfinite(v.item()) for v in out.values())


def test_all_nonfinite_gives_nan_and_count():
    d = _probes(3)
    d["score"][:] = float("nan")
    out = memorization_metrics(**d)
    assert out["nonfinite_count"].item() == 3
    assert all(math.isnan(v.item()) for k, v in out.items() if k != "nonfinite_count")


def test_validation_errors():
    d = _probes(4)
    with pytest.raises(ValueError, match=r"`lid` has 3, `score` has 4"):
        memorization_metrics(**{**d, "lid": d["lid"][:3]})
    with pytest.raises(ValueError, match=r"`nn_ratio` has 5"):
        memorization_metrics(**{**d, "nn_ratio": torch.rand(5)})
    with pytest.raises(ValueError, match=r"`score_threshold` must be a finite float, got nan"):
        MemorizationMetrics(score_threshold=float("nan"))
    with pytest.raises(ValueError, match=r"`nn_threshold`"):
        memorization_metrics(**d, nn_threshold="x")
    m = MemorizationMetrics()
    m.update(**d)
    no_nn = {k: v for k, v in d.items() if k != "nn_ratio"}
    with pytest.raises(ValueError, match=r"`nn_ratio` must be given to every update"):
        m.update(**no_nn)


def test_metric_matches_functional_and_accepts_shapes():
    d = _probes(12, seed=1)
    m = MemorizationMetrics(score_threshold=0.4)
    m.update(**{k: v[:5] for k, v in d.items()})
    m.update(**{k: v[5:].reshape(7, 1) for k, v in d.items()})  # flattened
    _assert_same(m.compute(), memorization_metrics(**d, score_threshold=0.4))


def test_reset_between_checks():
    m = MemorizationMetrics()
    a, b = _probes(8, seed=1), _probes(5, seed=2, nn=False)
    m.update(**a)
    _assert_same(m.compute(), memorization_metrics(**a))
    m.reset()
    m.update(**b)  # no nn_ratio in the second check: allowed after reset
    out = m.compute()
    assert set(out) == KEYS
    _assert_same(out, memorization_metrics(**b))


def test_states_are_cat_reduced():
    m = MemorizationMetrics()
    assert set(m._reductions) == {
        "sharp_fraction",
        "lid",
        "lambda_min",
        "normalized_mean",
        "score",
        "nn_ratio",
        "nonfinite",
        "has_nn_ratio",
    }
    assert all(fn is dim_zero_cat for fn in m._reductions.values())
    assert all(m._defaults[k] == [] for k in m._reductions)
    assert m.full_state_update is False and m.is_differentiable is False


@pytest.mark.parametrize("nn", [True, False])
def test_merge_state_equals_one_metric(nn):
    d = _probes(9, seed=4, nn=nn)
    d["lid"][7] = float("nan")
    whole, half1, half2 = MemorizationMetrics(), MemorizationMetrics(), MemorizationMetrics()
    whole.update(**d)
    half1.update(**{k: v[:4] for k, v in d.items()})
    half2.update(**{k: v[4:] for k, v in d.items()})
    half1.merge_state(half2)
    _assert_same(half1.compute(), whole.compute())


def _fake_ddp(gather):
    """Metric kwargs that make compute() run torchmetrics' real sync code with a fake gather."""
    return {"dist_sync_fn": gather, "distributed_available_fn": lambda: True}


@pytest.mark.parametrize("nn", [True, False])
def test_sync_path_with_fake_gather(nn):
    """A gather that pretends to see two identical ranks doubles every probe."""
    d = _probes(5, seed=5, nn=nn)
    d["score"][0] = float("nan")
    synced = MemorizationMetrics(**_fake_ddp(lambda t, group=None: [t, t.clone()]))
    twice = MemorizationMetrics()
    synced.update(**d)
    twice.update(**d)
    twice.update(**d)
    out = synced.compute()
    assert out["nonfinite_count"].item() == 2
    _assert_same(out, twice.compute())
    # the local state is restored after compute, so accumulation can go on
    assert isinstance(synced.score, list) and len(synced.score) == 1


def test_sync_with_empty_rank():
    """A rank that saw no probes contributes empty tensors; the nn_ratio keys must survive."""
    d = _probes(4, seed=6)
    m = MemorizationMetrics(**_fake_ddp(lambda t, group=None: [t, t[:0]]))
    m.update(**d)
    _assert_same(m.compute(), memorization_metrics(**d))
