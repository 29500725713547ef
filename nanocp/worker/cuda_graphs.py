"""Decode steps of a lone instance replayed as CUDA graphs, one per batch bucket, captured at start-up.

An eager decode step of a large MoE model launches thousands of small kernels, and the host's launch time, not the
GPU, sets its pace. A graph launches them all at once. Each bucket's graph reads static buffers (token ids,
positions, KV slots) and a FlashInfer decode wrapper whose tables are planned on the host before each replay; a step
of fewer rows pads up to its bucket with rows that write no KV (slot -1) and attend one token, their output dropped.
All graphs share one memory pool, captured largest first so the smaller ones reuse its blocks.

Only decode-only steps of an instance without peers are graphed: prefill chunks vary in shape, and a group's routes
vary in size. Those, and batches beyond the largest bucket, run eagerly, and the engine counts them.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable

import torch

from nanocp import kernels
from nanocp.kernels.attention import FLASHINFER_HEAD_DIMS
from nanocp.kernels.flashinfer_attention import GraphDecode
from nanocp.model_config import ModelConfig
from nanocp.worker.attention import GraphDecodePlan, PagedAttention
from nanocp.worker.model import Qwen3Moe, StepContext
from nanocp.worker.planner import StepInputs

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself): padding wastes at most 15 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def unsupported(config: ModelConfig, dtype: torch.dtype, device: str) -> str | None:
    """Why this model can't be graphed here, or None."""
    if not device.startswith("cuda"):
        return "CUDA graphs need a CUDA device"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"graphs run FlashInfer attention, which takes bf16 or fp16, not {dtype}"
    if config.head_dim not in FLASHINFER_HEAD_DIMS:
        return f"graphs run FlashInfer attention, whose heads are {FLASHINFER_HEAD_DIMS}, not {config.head_dim}"
    return None


class _Bucket:
    def __init__(self, rows: int, plan: GraphDecodePlan) -> None:
        self.rows = rows
        self.plan = plan
        self.graph = torch.cuda.CUDAGraph()
        self.hidden: torch.Tensor | None = None  # the captured output, rewritten by each replay


class DecodeGraphs:
    def __init__(self, model: Qwen3Moe, attention: PagedAttention, max_batch: int) -> None:
        self.model = model
        self.attention = attention
        cache = attention.cache
        device = cache.k.device
        config = model.config
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        plan_args = {
            "num_qo_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "page_size": cache.page_size,
            "q_data_type": cache.k.dtype,
            "kv_data_type": cache.k.dtype,
            "sm_scale": config.head_dim**-0.5,
        }
        self.buckets: list[_Bucket] = []
        for rows in bucket_sizes(max_batch):
            decode = GraphDecode(rows, cache.pool.num_pages, plan_args, device)
            self.buckets.append(_Bucket(rows, GraphDecodePlan(decode, self.slots[:rows])))
        self.sizes = [b.rows for b in self.buckets]
        self.replays = 0
        self.replay = True  # False runs each bucket's padded step eagerly: what a replay must equal, for tests

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Captures every bucket's graph, largest first; `progress(done, total)` after each."""
        pool = torch.cuda.graph_pool_handle()
        started = time.perf_counter()
        for done, bucket in enumerate(reversed(self.buckets), 1):
            bucket.plan.decode.plan(None)  # all padding: no KV written
            self.slots.fill_(-1)
            self.model(*self._inputs(bucket))  # warm-up: lazy initialisation must not happen under capture
            torch.cuda.synchronize()
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.hidden = self.model(*self._inputs(bucket))
            if progress is not None:
                progress(done, len(self.buckets))
        torch.cuda.synchronize()
        log.info(
            "captured %d decode graphs (batch %s) in %.1f s",
            len(self.buckets),
            ", ".join(map(str, self.sizes)),
            time.perf_counter() - started,
        )

    def forward(self, inputs: StepInputs, meta: kernels.AttentionMetadata) -> torch.Tensor:
        """The hidden states of a decode-only step's rows (meta: its plan's decode_metadata(), at most max_batch
        rows), by its bucket's graph."""
        rows = len(inputs.token_ids)
        bucket = self.buckets[bisect.bisect_left(self.sizes, rows)]
        self.token_ids[:rows].copy_(inputs.token_ids)
        self.token_ids[rows : bucket.rows].zero_()
        self.positions[:rows].copy_(inputs.positions)
        self.positions[rows : bucket.rows].zero_()
        self.slots[:rows].copy_(inputs.plan.local_slots)
        self.slots[rows : bucket.rows].fill_(-1)
        bucket.plan.decode.plan(meta)
        if not self.replay:
            return self.model(*self._inputs(bucket))[:rows]
        assert bucket.hidden is not None, "capture() first"
        bucket.graph.replay()
        self.replays += 1
        return bucket.hidden[:rows]

    def _inputs(self, bucket: _Bucket) -> tuple[torch.Tensor, StepContext]:
        """The bucket's static inputs, its plan set on the attention backend (what a capture records)."""
        self.attention.plan = bucket.plan
        return self.token_ids[: bucket.rows], StepContext(self.positions[: bucket.rows], self.attention)
