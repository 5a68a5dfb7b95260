"""memwatch.index: the copy index against exact brute force (memwatch.groundtruth), its tiers, eviction and merge."""

from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memwatch.errors import MemwatchError
from memwatch.groundtruth import MEMORIZED_RATIO, nearest_neighbours, nn_ratio
from memwatch.index import CopyIndex, Hits, IndexOptions, fill_from, merge_hits, nearest, ratio

SHAPE = (3, 4, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch / faiss thread: these tensors are small, and OpenMP threads on a shared machine
    wait for each other far longer than they compute."""
    try:
        import faiss
    except ImportError:
        faiss = None
    threads = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else 0
    torch.set_num_threads(1)
    if faiss:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    if faiss:
        faiss.omp_set_num_threads(threads[1])


def _data(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training samples ``[n, *SHAPE]`` and 12 probes: 6 planted copies (at growing noise), 6 fresh."""
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, *SHAPE, generator=g)
    noise = torch.linspace(0.01, 0.6, 6)[:, None, None, None]
    copies = train[:6] + noise * torch.randn(6, *SHAPE, generator=g)
    return train, torch.cat([copies, torch.randn(6, *SHAPE, generator=g)])


def _filled(train: torch.Tensor, **options) -> CopyIndex:
    index = CopyIndex(IndexOptions(**options), SHAPE)
    fill_from(index, train, batch_size=64)
    return index


@pytest.fixture(params=["faiss", "torch"])
def engine(request, monkeypatch):
    """Run a test with faiss and with the torch fallback (faiss's import made to fail)."""
    if request.param == "torch":
        monkeypatch.setitem(sys.modules, "faiss", None)
    return request.param


@pytest.mark.filterwarnings("ignore:faiss is not installed")
def test_the_exact_tier_gives_brute_force_distances_rows_and_ratios(engine):
    train, probes = _data()
    hits = _filled(train).search(probes)
    dist, index = nearest_neighbours(probes, train)
    torch.testing.assert_close(hits.distance, dist)
    assert torch.equal(hits.row, index)
    torch.testing.assert_close(ratio(hits), nn_ratio(probes, train))
    assert (ratio(hits)[:3] < MEMORIZED_RATIO).all() and (ratio(hits)[6:] > MEMORIZED_RATIO).all()
    assert torch.equal(nearest(hits)[0], index[:, 0])


def test_repeats_are_held_once_so_they_do_not_hide_a_copy():
    train, probes = _data(100)
    repeated = torch.cat([train, train[:40], train[:10]])
    index = CopyIndex(IndexOptions(), SHAPE)
    assert fill_from(index, repeated, batch_size=32) == 100 and len(index) == 100
    assert index.add(train[:5]) == 0  # held already
    hits = index.search(probes)
    torch.testing.assert_close(ratio(hits), nn_ratio(probes, torch.unique(train, dim=0).float()))
    assert (hits.row < 100).all()  # a repeat is named by its first row
    assert nn_ratio(probes[:1], repeated).item() == pytest.approx(1.0)  # the raw repeat would hide the copy


def test_fewer_than_two_samples_give_inf_distances_and_nan_ratios():
    index = CopyIndex(IndexOptions(), SHAPE)
    probes = torch.randn(3, *SHAPE)
    empty = index.search(probes)
    assert torch.isinf(empty.distance).all() and (empty.key == -1).all() and (empty.row == -1).all()
    assert torch.isnan(ratio(empty)).all()
    index.add(torch.zeros(1, *SHAPE), torch.tensor([7]))
    one = index.search(probes)
    assert torch.isfinite(one.distance[:, 0]).all() and torch.isinf(one.distance[:, 1]).all()
    assert (one.row[:, 0] == 7).all() and (one.key[:, 1] == -1).all() and torch.isnan(ratio(one)).all()


def test_a_probe_that_is_not_finite_gets_nan_and_the_others_their_answer():
    train, probes = _data(50)
    probes[2] = torch.nan
    hits = _filled(train).search(probes)
    assert torch.isnan(hits.distance[2]).all() and torch.isnan(ratio(hits)[2])
    keep = torch.arange(12) != 2
    torch.testing.assert_close(ratio(hits)[keep], nn_ratio(probes[keep], train))


def test_the_compressed_tier_is_exact_on_float16_vectors_and_keeps_the_labels():
    train, probes = _data(400)
    index = _filled(train, exact_limit=100)
    assert index.compressed and len(index) == 400
    hits = index.search(probes)
    dist, rows = nearest_neighbours(probes, train.half().float())
    torch.testing.assert_close(hits.distance, dist)
    assert torch.equal(hits.row, rows)
    truth = nn_ratio(probes, train)
    torch.testing.assert_close(ratio(hits), truth, rtol=2e-3, atol=1e-4)  # float16: 2⁻¹¹ ‖x‖ per distance
    assert torch.equal(ratio(hits) < MEMORIZED_RATIO, truth < MEMORIZED_RATIO)


def test_the_ivf_pq_tier_finds_the_copies_that_brute_force_finds():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    centers = 3 * torch.randn(40, 32, generator=g)  # clustered data, as images are
    train = (centers[torch.randint(40, (6000,), generator=g)] + torch.randn(6000, 32, generator=g)).reshape(6000, 2, 16)
    noise = torch.linspace(0.02, 0.6, 24)[:, None, None]
    probes = torch.cat([train[:24] + noise * torch.randn(24, 2, 16, generator=g), torch.randn(8, 2, 16, generator=g)])
    index = CopyIndex(IndexOptions(exact_limit=1000), (2, 16))
    fill_from(index, train, batch_size=1000)
    assert index._ivf is not None and index._ivf.ntotal == 6000
    truth = nn_ratio(probes, train)
    got = ratio(index.search(probes))
    assert ((got < MEMORIZED_RATIO) == (truth < MEMORIZED_RATIO)).float().mean() >= 0.95
    assert (truth < MEMORIZED_RATIO).sum() >= 8  # the test holds copies


def _held_after(seed: int, stream: torch.Tensor, capacity_bytes: int) -> set[int]:
    index = CopyIndex(IndexOptions(memory_mb=capacity_bytes / 2**20, exact_limit=2, seed=seed), (4,))
    for batch in stream.split(25):
        index.add(batch)
    assert len(index) == index.capacity == 50
    return {int(v) for v in index._store[: len(index), 0].float().round().tolist()}


def test_eviction_holds_a_uniform_sample_of_singletons():
    # 200 distinct samples, capacity 50 (97 bytes a vector of 4): each is held with p = 1/4.
    stream = torch.arange(200.0)[:, None].expand(200, 4).contiguous()
    counts = torch.zeros(200)
    seeds = 100
    for seed in range(seeds):
        for held in _held_after(seed, stream, 50 * 97):
            counts[held] += 1
    expected = seeds * 50 / 200
    chi2 = float(((counts - expected) ** 2 / expected).sum() * 4 / 3)  # binomial variance n p (1 - p)
    assert abs(chi2 - 199) < 4 * math.sqrt(2 * 199), chi2
    assert _held_after(3, stream, 50 * 97) == _held_after(3, stream, 50 * 97)  # fixed seed, fixed sample


def test_eviction_favours_an_item_repeated_in_the_stream():
    # item 0 comes back 8 times among 200 singletons: offered again whenever it was evicted.
    g = torch.Generator().manual_seed(0)
    values = torch.cat([torch.arange(200.0), torch.zeros(7)])[torch.randperm(207, generator=g)]
    stream = values[:, None].expand(207, 4).contiguous()
    held = [0 in _held_after(seed, stream, 50 * 97) for seed in range(60)]
    assert sum(held) / 60 > 0.45  # measured 0.57; a singleton: 0.25 ± 0.06 over 60 seeds


def test_flip_finds_a_mirrored_copy_and_is_invariant_to_mirroring():
    train, _ = _data(80)
    probe = train[3:4].flip(-1) + 0.01 * torch.randn(1, *SHAPE)
    plain = _filled(train)
    assert ratio(plain.search(probe)).item() > MEMORIZED_RATIO
    flipped = _filled(train, flip=True)
    hits = flipped.search(probe)
    assert hits.mirror is not None and ratio(hits).item() < MEMORIZED_RATIO
    assert nearest(hits)[0].item() == 3
    torch.testing.assert_close(ratio(flipped.search(probe.flip(-1))), ratio(hits))


def test_embed_fn_distances_are_l2_on_the_features():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Tanh()).eval()
    train, probes = _data(120)
    index = CopyIndex(IndexOptions(), SHAPE, embed_fn=net)
    fill_from(index, train)
    with torch.no_grad():
        dist, rows = nearest_neighbours(net(probes), net(train))
    hits = index.search(probes)
    torch.testing.assert_close(hits.distance, dist)
    assert torch.equal(hits.row, rows)


@pytest.mark.parametrize("options", [{}, {"flip": True}, {"vectors": "projection", "dim": 16}])
def test_merging_two_ranks_gives_the_single_index_answer(options):
    train, probes = _data(200)
    shards = [torch.cat([train[:120], train[:30]]), torch.cat([train[90:], train[100:110], train[:5]])]
    ranks = [_filled(shard, **options) for shard in shards]
    merged = merge_hits([rank.search(probes) for rank in ranks])
    whole = _filled(train, **options).search(probes)
    torch.testing.assert_close(merged.distance, whole.distance)
    assert torch.equal(merged.key, whole.key)
    torch.testing.assert_close(ratio(merged), ratio(whole))
    assert torch.equal(nearest(merged)[1], nearest(whole)[1])


def test_the_projection_is_a_fixed_seeded_map():
    train, probes = _data(100)
    hits = _filled(train, vectors="projection", dim=16).search(probes)
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(48, 16, generator=g) / 4
    dist, _ = nearest_neighbours(probes.reshape(12, -1) @ proj, train.reshape(100, -1) @ proj)
    torch.testing.assert_close(hits.distance, dist)


def test_without_faiss_the_answers_are_the_same_and_the_compressed_tier_names_the_extra(monkeypatch):
    train, probes = _data()
    with_faiss = _filled(train).search(probes)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exact tier needs no faiss: no warning
        index = CopyIndex(IndexOptions(), SHAPE)
        fill_from(index, train)
    torch.testing.assert_close(index.search(probes).distance, with_faiss.distance)
    small = CopyIndex(IndexOptions(exact_limit=2), SHAPE)
    with pytest.warns(RuntimeWarning, match=r"pip install memwatch\[index\]"):
        fill_from(small, train)  # past the exact tier: float16 vectors searched by torch brute force
    assert small.compressed and torch.isfinite(small.search(probes).distance).all()


def test_fill_from_a_tensor_a_dataset_and_a_dataloader_records_the_same_rows():
    train, probes = _data(90)
    dataset = TensorDataset(train, torch.arange(90))
    answers = []
    for data in (train, dataset, DataLoader(dataset, batch_size=7)):
        index = CopyIndex(IndexOptions(), SHAPE)
        assert fill_from(index, data, progress=True, batch_size=20) == 90
        answers.append(index.search(probes).row)
    assert torch.equal(answers[0], answers[1]) and torch.equal(answers[0], answers[2])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_mb", 0),
        ("memory_mb", -1.0),
        ("memory_mb", "1GB"),
        ("vectors", "pca"),
        ("dim", 0),
        ("exact_limit", 1),
        ("candidates", 1),
        ("candidates", 10**6),
        ("flip", "yes"),
        ("seed", -1),
        ("seed", 1.5),
    ],
)
def test_absurd_options_are_refused_by_name(field, value):
    with pytest.raises(MemwatchError, match=f"`{field}` must be"):
        IndexOptions(**{field: value})


def test_wrong_inputs_are_refused_loudly():
    index = CopyIndex(IndexOptions(), SHAPE)
    with pytest.raises(MemwatchError, match="`samples` must be a real tensor"):
        index.add(torch.zeros(4, 3, 4))
    with pytest.raises(MemwatchError, match="`probes` must be a real tensor"):
        index.search(torch.zeros(4, 48))
    bad = torch.zeros(4, *SHAPE)
    bad[2, 0, 0, 0] = torch.nan
    with pytest.raises(MemwatchError, match="must be finite.*first: 2"):
        index.add(bad)
    with pytest.raises(MemwatchError, match="`rows` must be a tensor"):
        index.add(torch.zeros(4, *SHAPE), torch.arange(3))
    with pytest.raises(MemwatchError, match="`embed_fn` must map"):
        CopyIndex(IndexOptions(), SHAPE, embed_fn=lambda x: x).add(torch.zeros(2, *SHAPE))
    with pytest.raises(MemwatchError, match="`sample_shape`"):
        CopyIndex(IndexOptions(), (3, 0))
    with pytest.raises(MemwatchError, match="`hits` must be for the same probes"):
        merge_hits([index.search(torch.zeros(2, *SHAPE)), index.search(torch.zeros(3, *SHAPE))])
    assert len(index) == 0  # a refused batch adds nothing


def test_the_options_read_as_a_nested_group_in_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--index", type=IndexOptions, default=IndexOptions())
    cfg = parser.parse_args(["--index.memory_mb=64", "--index.vectors=projection", "--index.flip=true"])
    options = parser.instantiate_classes(cfg).index
    assert options == IndexOptions(memory_mb=64.0, vectors="projection", flip=True)


def test_hits_are_plain_tensors_for_a_ddp_gather():
    train, probes = _data(30)
    hits = _filled(train).search(probes)
    assert isinstance(hits, Hits) and hits.distance.dtype == torch.float64
    assert hits.key.dtype == hits.row.dtype == torch.int64 and hits.distance.shape == (12, 2)


@pytest.mark.parametrize("options", [{"vectors": "projection", "dim": 4, "candidates": 200}, {"exact_limit": 50}])
def test_re_ranking_on_the_reference_data_is_exact_in_the_sample_space(options):
    train, probes = _data(150)
    index = _filled(train, **options)
    dist, rows = nearest_neighbours(probes, train)
    for reference in (train, TensorDataset(train)):
        hits = index.search(probes, reference=reference)
        torch.testing.assert_close(hits.distance, dist)
        assert torch.equal(hits.row, rows)
    assert not torch.allclose(index.search(probes).distance, dist)  # the stored vectors alone are not exact


def test_re_ranking_on_the_reference_data_needs_the_rows():
    train, probes = _data(20)
    index = CopyIndex(IndexOptions(), SHAPE)
    index.add(train)
    with pytest.raises(MemwatchError, match="needs every held sample's row"):
        index.search(probes, reference=train)


def test_eviction_keeps_the_ivf_pq_index_in_step_with_the_held_samples():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(2)
    train = torch.randn(7000, 32, generator=g)
    index = CopyIndex(IndexOptions(memory_mb=5000 * 156 / 2**20, exact_limit=500), (32,))  # 156 bytes a sample
    fill_from(index, train, batch_size=1000)
    assert index.capacity == len(index) == 5000 and index.offers == 7000
    assert index._ivf is not None and index._ivf.ntotal == 5000
    held = index._rows[:5000]
    hits = index.search(train[held[:20]])
    assert torch.equal(hits.row[:, 0], held[:20]) and (hits.distance[:, 0] < 1e-2).all()  # found, at fp16 rounding
    assert set(index.search(train[:50]).row.flatten().tolist()) <= set(held.tolist())  # never an evicted sample


def test_the_progress_bar_falls_back_to_rich_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    train, _ = _data(40)
    assert fill_from(CopyIndex(IndexOptions(), SHAPE), train, progress=True, batch_size=16) == 40


def test_ranks_filling_shards_of_the_reference_data_merge_to_the_whole_answer():
    train, probes = _data(150)
    whole = _filled(train).search(probes)
    for data in (train, TensorDataset(train), DataLoader(TensorDataset(train), batch_size=20)):
        ranks = [CopyIndex(IndexOptions(), SHAPE) for _ in range(3)]
        for rank, index in enumerate(ranks):
            fill_from(index, data, batch_size=20, shard=(rank, 3))
        assert sum(len(index) for index in ranks) == 150
        merged = merge_hits([index.search(probes) for index in ranks])
        torch.testing.assert_close(merged.distance, whole.distance)
        assert torch.equal(merged.row, whole.row)


def test_an_embed_fn_that_fails_changes_nothing():
    train, probes = _data(40)
    calls = []

    def flaky(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return x.reshape(x.shape[0], -1)

    index = CopyIndex(IndexOptions(), SHAPE, embed_fn=flaky)
    index.add(train[:20])
    with pytest.raises(RuntimeError):
        index.add(train[20:])
    assert len(index) == index.offers == 20
    assert index.add(train[20:]) == 20
    torch.testing.assert_close(ratio(index.search(probes)), nn_ratio(probes, train))


def _views(items: torch.Tensor, per_item: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_item`` views of each item (the item plus small distinct perturbations, as augmentations
    give) ``[m * per_item, *SHAPE]`` and their item ids ``[m * per_item]``."""
    g = torch.Generator().manual_seed(seed)
    wiggle = 0.05 * torch.randn(items.shape[0], per_item, *SHAPE, generator=g)
    wiggle[:, 0] = 0  # the item itself is one of its views
    views = (items[:, None] + wiggle).flatten(0, 1)
    return views, torch.arange(items.shape[0]).repeat_interleave(per_item)


@pytest.mark.parametrize("engine_name", ["faiss", "torch"])
def test_views_of_one_item_are_not_each_others_second_neighbour(engine_name, monkeypatch):
    if engine_name == "torch":
        monkeypatch.setitem(sys.modules, "faiss", None)
    items = torch.randn(20, *SHAPE, generator=torch.Generator().manual_seed(3))
    views, ids = _views(items, per_item=40)  # more views than `candidates`: the search must widen
    probes = items[:4] + 0.03 * torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(4))
    plain = CopyIndex(IndexOptions(candidates=8), SHAPE)
    plain.add(views)
    by_item = CopyIndex(IndexOptions(candidates=8), SHAPE)
    by_item.add(views[:500], items=ids[:500])
    by_item.add(views[500:], items=ids[500:])
    truth = nn_ratio(probes, items)  # per item: the probe against the items themselves
    assert (truth < MEMORIZED_RATIO).all()
    assert (ratio(plain.search(probes)) > MEMORIZED_RATIO).all()  # another view hides the copy
    hits = by_item.search(probes)
    assert (ratio(hits) < MEMORIZED_RATIO).all()
    assert torch.equal(hits.key[:, 0], torch.arange(4)) and (hits.key[:, 1] != hits.key[:, 0]).all()
    # the second neighbour is the nearest view of any other item: brute force over the views
    others = torch.stack([torch.cdist(p.flatten()[None], views[ids != i].flatten(1)).min() for i, p in enumerate(probes)])
    torch.testing.assert_close(hits.distance[:, 1], others.double())


def test_item_ids_merge_over_ranks_like_one_index():
    items = torch.randn(30, *SHAPE, generator=torch.Generator().manual_seed(5))
    views, ids = _views(items, per_item=6)
    probes = torch.cat([items[:5] + 0.05, torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(6))])
    whole = CopyIndex(IndexOptions(), SHAPE)
    whole.add(views, items=ids)
    ranks = [CopyIndex(IndexOptions(), SHAPE) for _ in range(2)]
    for rank, part in zip(ranks, (slice(0, 100), slice(80, None))):  # overlapping shards, as DDP epochs give
        rank.add(views[part], items=ids[part])
    merged = merge_hits([rank.search(probes) for rank in ranks])
    expected = whole.search(probes)
    torch.testing.assert_close(merged.distance, expected.distance)
    assert torch.equal(merged.key, expected.key)


def test_item_ids_are_given_with_every_add_or_none():
    index = CopyIndex(IndexOptions(), SHAPE)
    index.add(torch.randn(3, *SHAPE), items=torch.tensor([1, 1, 2]))
    with pytest.raises(MemwatchError, match="every call of add"):
        index.add(torch.randn(2, *SHAPE))
    with pytest.raises(MemwatchError, match="integer tensor"):
        index.add(torch.randn(2, *SHAPE), items=torch.tensor([1.0, 2.0]))
    plain = CopyIndex(IndexOptions(), SHAPE)
    plain.add(torch.randn(2, *SHAPE))
    with pytest.raises(MemwatchError, match="holds no item ids"):
        plain.add(torch.randn(2, *SHAPE), items=torch.tensor([1, 2]))
