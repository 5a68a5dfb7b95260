import pytest
import torch

from memwatch.groundtruth import MEMORIZED_RATIO, median_nn_distance, nearest_neighbours, nn_ratio


def test_nn_ratio_matches_brute_force_and_streams():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 1, 4, 4, generator=g)
    samples = torch.cat([train[:5] + 0.01 * torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)])
    full = torch.cdist(samples.flatten(1).double(), train.flatten(1).double()).sort(1).values[:, :2]
    dist, idx = nearest_neighbours(samples, train, chunk_size=37)
    torch.testing.assert_close(dist, full)
    assert idx[:5, 0].tolist() == [0, 1, 2, 3, 4]
    ratio = nn_ratio(samples, train, chunk_size=64)
    assert bool((ratio[:5] < MEMORIZED_RATIO).all()) and bool((ratio[5:] > MEMORIZED_RATIO).all())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(train), batch_size=100)
    torch.testing.assert_close(nn_ratio(samples, loader), ratio)


def test_nn_ratio_errors():
    with pytest.raises(ValueError, match="shape"):
        nn_ratio(torch.randn(2, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        nn_ratio(torch.randn(2, 3), torch.randn(1, 3))


def test_median_nn_distance_matches_brute_force_and_subsamples():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 2, 3, generator=g)
    dist = torch.cdist(x.flatten(1).double(), x.flatten(1).double()).fill_diagonal_(float("inf"))
    assert median_nn_distance(x) == pytest.approx(float(dist.min(1).values.median()))
    sub = median_nn_distance(x, max_queries=100, generator=torch.Generator().manual_seed(0))
    assert sub == pytest.approx(float(dist.min(1).values.median()), rel=0.2)
    dup = torch.cat([x[:1], x[:1], x[1:3]])  # an exact duplicate is at distance 0 from its twin
    assert median_nn_distance(dup) <= float(dist[1, 2])
    with pytest.raises(ValueError, match="train_data"):
        median_nn_distance(torch.randn(1, 3))
