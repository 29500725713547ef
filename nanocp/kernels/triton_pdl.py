"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels of a step.

A decode step at small batches is a chain of short kernels, each of which waits for its predecessor to end, drain
and flush before its own blocks are even scheduled: a few microseconds a launch, a large part of a 1-token step.
Launched with PDL, a kernel is scheduled while the one before it still runs and waits on the device
(`griddepcontrol.wait`) for that one's results; and by triggering its own dependents as soon as its wait returns,
it lets the next kernel be scheduled in turn. FlashInfer's norms and decode already launch this way; CUDA graphs
capture the programmatic edges.

Every kernel launched with PDL calls `await_inputs` before its first load: the wait returns when the previous grid
has completed and its writes are visible, and as every kernel triggers only after its own wait, whatever ran
before that is complete too.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_options(tensor: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments a kernel taking a `PDL` constexpr is launched with, on `tensor`'s device."""
    pdl = _supported(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
    return {"PDL": pdl, "launch_pdl": pdl}


@triton.jit
def await_inputs(PDL: tl.constexpr):  # type: ignore[no-untyped-def]
    """Wait for the previous kernel's writes, then let the next kernel be scheduled (a no-op without PDL)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
