"""Small Python lists to tensors, for the per-step bookkeeping of decoding.

torch.tensor(list) parses every Python object on its own (about 10 µs for 64 ints, 90 µs for 64
rows of 5 floats); array.array converts the same list in C and torch.frombuffer takes its memory as
it is, in 1-5 µs. At one decode step per millisecond, that difference is the per-row overhead.
"""

from __future__ import annotations

import array
from collections.abc import Iterable

import torch


def long_tensor(values: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """A flat int64 tensor of `values`, on `device`."""
    return _from_array(array.array("q", values), torch.int64, device)


def float_tensor(values: Iterable[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """A flat float32 tensor of `values`, on `device`."""
    return _from_array(array.array("f", values), torch.float32, device)


def _from_array(values: array.array, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    if not values:  # frombuffer refuses an empty buffer
        return torch.empty(0, dtype=dtype, device=device)
    return torch.frombuffer(values, dtype=dtype).to(device)
