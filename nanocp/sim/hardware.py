"""Devices and links of a simulated decode group.

A device is its memory, the copy bandwidth measured on it (what the calibrated efficiencies are fractions of) and
its dense bf16 FLOPs. A link carries the MoE all-to-all and the CP query routes between the group's instances: its
bandwidth per GPU and direction, the latency of one all-to-all (plus a share per peer, which is what gloo over
loopback pays), and the latency of one CP route leg.

The GPU links are assumptions, not measurements (nanocp has no multi-GPU run yet): NVLink-class is an H100 SXM's
NVLink 4 (450 GB/s a direction; NCCL all-to-all of small messages inside a CUDA graph about 10 us; a CP leg of a few
microseconds, the range where docs/design.md expects DCP to pay), InfiniBand-class a 400 Gb/s NDR port per GPU
(50 GB/s; about 25 us an all-to-all, 10 us a CP leg, so 20 us a layer out and back). The CPU link is fitted
(nanocp.sim.calibration).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    copy_bytes_per_s: float  # device-to-device copy, as the benchmarks measure it
    flops: float  # dense bf16 peak
    reserved_bytes: float = 0.0  # activations, graphs, workspace: not for weights or KV


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float  # per instance and direction
    alltoall_latency_s: float
    p2p_latency_s: float  # one leg of a CP route (queries out, or partials back)
    per_peer_latency_s: float = 0.0


GB = 1e9

DEVICES: dict[str, Device] = {
    # Copy bandwidths as bench/results measured them (cp_attention_split on an H100, gpu_decode_step on an H200).
    "h100": Device("h100", 80 * GB, 3.0e12, 989e12, reserved_bytes=8 * GB),
    "h200": Device("h200", 141 * GB, 4.25e12, 989e12, reserved_bytes=10 * GB),
    # The embedded CPU group: what matters is fitted; the KV pool is given in pages.
    "cpu": Device("cpu", 16 * GB, 10e9, 100e9),
}

LINKS: dict[str, Link] = {
    "nvlink": Link("nvlink", 450 * GB, alltoall_latency_s=10e-6, p2p_latency_s=2.5e-6),
    "infiniband": Link("infiniband", 50 * GB, alltoall_latency_s=25e-6, p2p_latency_s=10e-6),
}
