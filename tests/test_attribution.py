"""memwatch.attribution: copied items and per-probe neighbours on synthetic data, closed form."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from memwatch.attribution import CopiedItem, copied_items, item_ids, probe_neighbours
from memwatch.errors import MemwatchError
from memwatch.groundtruth import nearest_neighbours


def _grid_reference() -> torch.Tensor:
    """Five points on a line, 10 apart: item i at (10 i, 0)."""
    return torch.stack([torch.arange(5, dtype=torch.float64) * 10, torch.zeros(5, dtype=torch.float64)], 1)


def test_copies_counted_from_nearest_neighbours_closed_form():
    ref = _grid_reference()
    # probes: three near item 3 (two exact copies, one half-way to item 4), one copy of item 0,
    # one half-way between items 1 and 2 (nearest 1: ratio 4.9/5.1, no copy)
    samples = torch.tensor([[30.0, 0.0], [30.5, 0.0], [34.9, 0.0], [0.0, 1.0], [14.9, 0.0]], dtype=torch.float64)
    dist, index = nearest_neighbours(samples, ref)
    ratio = dist[:, 0] / dist[:, 1]
    assert ratio.tolist() == pytest.approx([0.0, 0.5 / 9.5, 4.9 / 5.1, 1 / math.sqrt(101), 4.9 / 5.1])
    flagged = torch.tensor([False, True, True, True, True])
    items = copied_items(index[:, 0], ratio, flagged, num_items=5)
    assert items == [
        CopiedItem(index=3, id=3, copies=2, flagged_copies=1, probes=(0, 1, 2)),
        CopiedItem(index=0, id=0, copies=1, flagged_copies=1, probes=(3,)),
        CopiedItem(index=1, id=1, copies=0, flagged_copies=0, probes=(4,)),
    ]


def test_sorted_by_copies_then_flagged_then_index():
    nearest = torch.tensor([4, 4, 1, 1, 0, 0, 2])
    ratio = torch.full((7,), 0.1)
    flagged = torch.tensor([False, False, True, False, False, False, False])
    order = [c.index for c in copied_items(nearest, ratio, flagged)]
    assert order == [1, 0, 4, 2]  # 1: 2 copies 1 flagged; 0 and 4: 2 copies, 0 flagged (index breaks the tie)


def test_nan_ratio_is_no_copy_and_flagged_defaults_to_none():
    items = copied_items(torch.tensor([0, 0]), torch.tensor([float("nan"), 0.2]))
    assert items == [CopiedItem(0, 0, 1, 0, (0, 1))]
    assert copied_items(torch.tensor([], dtype=torch.long), torch.tensor([])) == []


def test_ratio_exactly_one_third_is_no_copy():
    (item,) = copied_items(torch.tensor([0]), torch.tensor([1.0 / 3.0], dtype=torch.float64))
    assert item.copies == 0


class _PairDataset(Dataset):
    def __init__(self, names, as_dict=False):
        self.names, self.as_dict = names, as_dict
        self.reads: list[int] = []

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        self.reads.append(i)
        x = torch.zeros(2)
        return {"image": x, "id": self.names[i]} if self.as_dict else (x, self.names[i])


@pytest.mark.parametrize("as_dict", [False, True])
def test_ids_from_a_dataset_read_only_for_the_items_returned(as_dict):
    ds = _PairDataset([f"img{i}" for i in range(6)], as_dict=as_dict)
    items = copied_items(torch.tensor([5, 2, 5]), torch.tensor([0.1, 0.1, 0.1]), ids=ds)
    assert [(c.index, c.id) for c in items] == [(5, "img5"), (2, "img2")]
    assert sorted(ds.reads) == [2, 5]


def test_ids_from_a_list_and_tensor_ids_become_numbers():
    items = copied_items(torch.tensor([1]), torch.tensor([0.0]), ids=torch.tensor([10, 11]))
    assert items[0].id == 11 and isinstance(items[0].id, int)
    assert item_ids(["a", "b", "c"], torch.tensor([2, 0])) == ["c", "a"]


def test_errors_name_the_argument():
    with pytest.raises(MemwatchError, match="`nearest` indices must lie in \\[0, 3\\)"):
        copied_items(torch.tensor([3]), torch.tensor([0.1]), num_items=3)
    with pytest.raises(MemwatchError, match="`nearest` indices must lie in \\[0, 2\\)"):
        copied_items(torch.tensor([2]), torch.tensor([0.1]), ids=["a", "b"])
    with pytest.raises(MemwatchError, match="`ids` must hold `num_items`=3"):
        copied_items(torch.tensor([0]), torch.tensor([0.1]), num_items=3, ids=["a"])
    with pytest.raises(MemwatchError, match="`nearest` must be an integer tensor"):
        copied_items(torch.tensor([0.0]), torch.tensor([0.1]))
    with pytest.raises(MemwatchError, match="must all be \\[n\\]"):
        copied_items(torch.tensor([0, 1]), torch.tensor([0.1]))

    class Bad(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(2)

    with pytest.raises(MemwatchError, match="must be \\(data, id\\) or a mapping"):
        copied_items(torch.tensor([0]), torch.tensor([0.1]), ids=Bad())


def test_probe_neighbours_against_a_dense_sort():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 3, 2, generator=g, dtype=torch.float64)
    samples = torch.randn(7, 3, 2, generator=g, dtype=torch.float64)
    dense = torch.cdist(samples.flatten(1), ref.flatten(1))
    want_d, want_i = dense.sort(dim=1)
    for k in (1, 2, 3, 5):
        dist, index = probe_neighbours(samples, ref, k=k, chunk_size=8)  # several chunks
        assert dist.dtype == torch.float64 and dist.shape == index.shape == (7, k)
        torch.testing.assert_close(dist, want_d[:, :k], rtol=0, atol=1e-12)
        assert torch.equal(index, want_i[:, :k])
    # an iterable of (data, label) batches gives the same answer
    dist, index = probe_neighbours(samples, [(ref[:20], None), (ref[20:], None)], k=4)
    assert torch.equal(index, want_i[:, :4])


def test_probe_neighbours_errors():
    ref = torch.zeros(3, 2)
    with pytest.raises(MemwatchError, match="`k` must be a positive integer"):
        probe_neighbours(torch.zeros(1, 2), ref, k=0)
    with pytest.raises(MemwatchError, match="at least k=4 items, got 3"):
        probe_neighbours(torch.zeros(1, 2), ref, k=4)
    with pytest.raises(MemwatchError, match="shape"):
        probe_neighbours(torch.zeros(1, 3), ref, k=3)


# The end-to-end claim — in a digits run where 2 images are held 40×, the attribution table names
# exactly those first — is examples/attribution.py's exit status, run by tests/test_examples.py.
