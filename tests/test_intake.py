"""The batch intake's readers of what a batch holds (mirrors :mod:`memwatch.intake`): the probe
shape from a batch, the data selector, the value range, and reference data checked and encoded
into the probes' space."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memwatch.errors import MemwatchError
from memwatch.intake import batch_range, batch_sample_shape, check_reference_data


def test_batch_sample_shape():
    x, y = torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
    assert batch_sample_shape(x) == (3, 8, 8)
    assert batch_sample_shape((x, y)) == (3, 8, 8)
    assert batch_sample_shape([y.float()[:, None], x]) == (1,)  # the first tensor, whatever it holds
    assert batch_sample_shape({"label": y, "image": x}, "image") == (3, 8, 8)
    assert batch_sample_shape({"image": x, "label": y}) == (3, 8, 8)
    with pytest.raises(MemwatchError, match=r"`data.select`='images' is not a key.*\['label', 'image'\]"):
        batch_sample_shape({"label": y, "image": x}, "images")
    with pytest.raises(MemwatchError, match=r"`data.select`='image' is not a key of a tensor in .* none \(a tuple\)"):
        batch_sample_shape((x, y), "image")
    with pytest.raises(MemwatchError, match=r"cannot find a tensor.*`data.select`.*`data.sample_shape`"):
        batch_sample_shape(["a", "b"])
    with pytest.raises(MemwatchError, match=r"shape \(4,\), not \[batch, \*sample_shape\]"):
        batch_sample_shape(y)


def test_batch_range_widens_over_batches_and_skips_what_holds_no_float():
    assert batch_range(torch.tensor([[0.0, 2.0], [float("nan"), -1.0]])) == (-1.0, 2.0)
    assert batch_range((torch.tensor([[5.0]]), torch.zeros(1)), 0, seen=(-1.0, 2.0)) == (-1.0, 5.0)
    assert batch_range(torch.tensor([[1, 2]]), seen=(0.0, 1.0)) == (0.0, 1.0)  # integers: units unknown here
    assert batch_range(["no", "tensor"], seen=None) is None


# ------------------------------------------------------------------------ reference data
def _encode(x):
    """A fixed stand-in for a VAE encoder: [b, 3, 32, 32] images → [b, 4, 8, 8] latents."""
    pooled = nn.functional.avg_pool2d(x, 4)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)


def test_reference_data_in_another_space_fails_with_a_hint():
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with pytest.raises(MemwatchError, match=r"`reference_data` samples have shape \(3, 32, 32\).*\(4, 8, 8\).*encode"):
        check_reference_data(pixels, (4, 8, 8))
    with pytest.raises(MemwatchError, match=r"`data.encode_fn` maps .* \(3, 32, 32\) to shape \(3, 8, 8\)"):
        check_reference_data(pixels, (4, 8, 8), lambda x: nn.functional.avg_pool2d(x, 4))
    with pytest.raises(MemwatchError, match=r"`encode_fn` fails on a `reference_data` chunk"):
        check_reference_data(pixels, (4, 8, 8), lambda x: x.view(-1, 7))
    with pytest.raises(MemwatchError, match=r"`encode_fn` must return a tensor"):
        check_reference_data(pixels, (4, 8, 8), lambda x: x.tolist())


def test_reference_data_is_encoded_in_chunks_and_materialized():
    pixels = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    sizes = []

    def encode(x):
        sizes.append(x.shape[0])
        return _encode(x)

    latents = check_reference_data(pixels, (4, 8, 8), encode, batch_size=4)
    assert sizes == [4, 2] and torch.equal(latents, _encode(pixels)) and latents.device.type == "cpu"
    batches = [{"label": torch.zeros(3), "image": pixels[:3]}, {"label": torch.zeros(3), "image": pixels[3:]}]
    from_batches = check_reference_data(batches, (4, 8, 8), _encode, batch_key="image")
    assert torch.allclose(from_batches, latents)
    assert torch.equal(check_reference_data([(pixels, 0)], (3, 32, 32)), pixels)
    with pytest.raises(MemwatchError, match=r"at least 2 samples, got 1"):
        check_reference_data(pixels[:1], (3, 32, 32))
    with pytest.raises(MemwatchError, match=r"at least 2 samples, got 0"):
        check_reference_data([], (3, 32, 32))
    with pytest.raises(MemwatchError, match=r"`data.select`='images' is not a key.*`reference_data` batch"):
        check_reference_data(batches, (4, 8, 8), _encode, batch_key="images")
