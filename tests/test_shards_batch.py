"""The one batch stacker: loader samples -> the model's batch (seam 2)."""

import numpy as np
import pytest
import torch

from shards.batch import stack_batch


def test_stack_batch_from_read_only_arrays_and_tensors():
    a = np.frombuffer(bytes(range(8)), dtype=np.uint8).reshape(2, 2, 2)  # read-only, like a decoded shard
    assert not a.flags.writeable
    batch = stack_batch([{"key": "a", "hr": a, "report": "x", "meta": {"m": 1}}, {"key": "b", "hr": a + 1}])
    assert batch["hr"].shape == (2, 1, 2, 2, 2) and batch["hr"].dtype == torch.uint8
    assert batch["hr"][1].flatten().tolist() == list(range(1, 9))
    batch["hr"] += 1  # writable: no aliasing of the read-only buffer
    assert a[0, 0, 0] == 0
    assert batch["key"] == ["a", "b"] and batch["report"] == ["x", None] and batch["meta"] == [{"m": 1}, {}]
    t = stack_batch([{"key": "c", "hr": torch.ones(1, 2, 2, 2, dtype=torch.uint8)}])
    assert t["hr"].shape == (1, 1, 2, 2, 2)


def test_stack_batch_empty():
    assert stack_batch([], (3, 4, 5), "int16")["hr"].shape == (0, 1, 3, 4, 5)
    with pytest.raises(ValueError, match="no samples"):
        stack_batch([])
