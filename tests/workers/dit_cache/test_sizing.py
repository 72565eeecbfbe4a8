"""What a DiT cache value weighs and how it is copied or moved (`workers.dit_cache.sizing`):
the exact weight the cache's accounting rests on, the values it accepts, and copies
that share no storage with what they were made from."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch

from workers.dit_cache.sizing import (
    clone_value,
    iter_tensors,
    map_tensors,
    move_to,
    tensor_nbytes,
    value_nbytes,
)

Pair = namedtuple("Pair", ["latents", "step"])


def nested() -> dict:
    return {
        "embeds": torch.ones(2, 3),  # 24 bytes
        "more": [
            torch.ones(4, dtype=torch.float16),  # 8
            (torch.ones(1, dtype=torch.int64), 3, "text", None, 1.5, True),  # 8
        ],
        "pair": Pair(torch.ones(2, dtype=torch.float64), 7),  # 16
        "shape": torch.Size([1, 16, 8, 8]),
        "meta": {"dtype": torch.float32, "device": torch.device("cpu"), "step": 5},
    }


def test_weight_is_numel_times_element_size_of_every_tensor() -> None:
    value = nested()
    assert value_nbytes(value) == 24 + 8 + 8 + 16
    assert [t.dtype for t in iter_tensors(value)] == [
        torch.float32,
        torch.float16,
        torch.int64,
        torch.float64,
    ]  # depth first, in order
    assert value_nbytes({"step": 3, "name": "x", "none": None}) == 0  # leaves weigh nothing


def test_views_and_expanded_tensors_weigh_their_elements() -> None:
    base = torch.zeros(10)
    assert value_nbytes([base, base[:5]]) == 40 + 20  # each view counted
    assert tensor_nbytes(torch.zeros(1).expand(100)) == 400  # not the 4-byte storage


@pytest.mark.parametrize("leaf", [np.zeros(2), b"bytes", object(), {1, 2}])
def test_unsupported_values_are_a_type_error(leaf) -> None:
    with pytest.raises(TypeError, match="the DiT cache stores tensors"):
        value_nbytes({"ok": torch.zeros(1), "bad": leaf})
    with pytest.raises(TypeError, match="the DiT cache stores tensors"):
        map_tensors([leaf], lambda t: t)


def test_a_sparse_tensor_cannot_be_weighed() -> None:
    with pytest.raises(TypeError, match="densify"):
        value_nbytes(torch.zeros(4, 4).to_sparse())


def test_mapping_rebuilds_containers_and_keeps_leaves() -> None:
    value = {**nested(), "ordered": OrderedDict(a=torch.ones(1))}
    doubled = map_tensors(value, lambda t: t * 2)
    assert isinstance(doubled["pair"], Pair) and doubled["pair"].step == 7
    assert isinstance(doubled["more"], list) and isinstance(doubled["more"][1], tuple)
    assert doubled["more"][1][1:] == (3, "text", None, 1.5, True)
    assert doubled["shape"] == torch.Size([1, 16, 8, 8])
    assert type(doubled["shape"]) is torch.Size
    assert doubled["meta"] == value["meta"]
    assert type(doubled["ordered"]) is dict  # dict subclasses come back as plain dicts
    assert torch.equal(doubled["embeds"], torch.full((2, 3), 2.0))
    assert torch.equal(value["embeds"], torch.ones(2, 3))  # the original is untouched


def storages(value) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in iter_tensors(value)}


def test_move_with_copy_and_clone_share_no_storage() -> None:
    value = nested()
    value["grad"] = torch.ones(3, requires_grad=True)
    for copy in (move_to(value, "cpu", copy=True), clone_value(value)):
        assert not storages(copy) & storages(value)
        assert value_nbytes(copy) == value_nbytes(value)
        assert all(not t.requires_grad for t in iter_tensors(copy))  # detached
        assert all(
            torch.equal(a, b) for a, b in zip(iter_tensors(copy), iter_tensors(value), strict=True)
        )
    # Without copy, a tensor already on the device is the same storage (detached).
    moved = move_to(value, "cpu")
    assert storages(moved) == storages(value)
    assert not moved["grad"].requires_grad
