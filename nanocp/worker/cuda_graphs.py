"""Decode steps replayed as CUDA graphs, one per bucket, captured at start-up: a lone instance's and a group's.

An eager decode step of a large MoE model launches thousands of small kernels, and the host's launch time, not the
GPU, sets its pace. A graph launches them all at once. A bucket is a number of home rows (1, 2, 4, 8, then every 16)
and, in a group, whether CP routes run. Its graph reads static buffers (token ids, positions, KV slots, the CP
routes' slot tables) and decode attention whose tables are planned on the host before each replay (FlashInfer's,
or at a few rows a Triton split-KV decode; `StaticPlan`); the MoE and CP routes inside it are all-to-alls of fixed
size (`routing`), so every member of a group replays the same collectives. All graphs share one memory pool,
captured largest first so the smaller ones reuse its blocks, and the buffers a graph captured are the ones every
replay uses.

Steps with a prefill chunk anywhere in the group, and batches beyond the largest bucket, run eagerly, and the model
runner counts them.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from nanocp.kernels.attention import FLASHINFER_HEAD_DIMS
from nanocp.kernels.flashinfer_attention import GraphDecode
from nanocp.model_config import ModelConfig
from nanocp.worker.attention import PagedAttention, StaticPlan, StaticRoutes
from nanocp.worker.model import Qwen3Moe, StepContext
from nanocp.worker.planner import StepInputs

if TYPE_CHECKING:
    from nanocp.worker.attention import DecodeInGraph

log = logging.getLogger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself): padding wastes at most 15 rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


def bucket_for(rows: int, sizes: list[int]) -> int:
    """The smallest bucket that holds `rows` (at most sizes[-1])."""
    return sizes[bisect.bisect_left(sizes, rows)]


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
    def __init__(self, plan: StaticPlan, moe_capacity: int) -> None:
        self.plan = plan  # its static buffers, rewritten before each replay
        self.moe_capacity = moe_capacity
        self.graph = torch.cuda.CUDAGraph()
        self.hidden: torch.Tensor | None = None  # the captured output, rewritten by each replay


class DecodeGraphs:
    def __init__(
        self, model: Qwen3Moe, attention: PagedAttention, max_batch: int, peers: int, moe_capacity: Callable[[int], int]
    ) -> None:
        self.model = model
        self.attention = attention
        cache = attention.cache
        device = cache.k.device
        config = model.config
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        plan_args = {
            "num_qo_heads": config.num_heads,
            "num_kv_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "page_size": cache.page_size,
            "q_data_type": cache.k.dtype,
            "kv_data_type": cache.k.dtype,
            "sm_scale": config.head_dim**-0.5,
        }

        def decode(rows: int) -> DecodeInGraph:
            from nanocp.kernels import triton_decode  # GPU machines only

            if rows <= triton_decode.MAX_ROWS:  # few rows: faster than FlashInfer's (triton_decode's docstring)
                return triton_decode.SplitDecode(rows, cache.pool.num_pages, plan_args, device)
            return GraphDecode(rows, cache.pool.num_pages, plan_args, device)

        def index(*shape: int, fill: int = 0) -> torch.Tensor:
            return torch.full(shape, fill, dtype=torch.int64, device=device)

        self.sizes = bucket_sizes(max_batch)
        self.buckets: dict[tuple[int, bool], _Bucket] = {}
        for rows in self.sizes:
            for cp in (False, True) if peers > 1 else (False,):
                routes = None
                if cp:
                    slots = peers * rows
                    routes = StaticRoutes(index(slots), index(slots), index(slots, fill=-1), index(peers, rows))
                received = decode(peers * rows) if cp else None
                plan = StaticPlan(rows, index(rows, fill=-1), None, routes, None, (decode(rows), received))
                self.buckets[(rows, cp)] = _Bucket(plan, moe_capacity(rows))
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
        ordered = sorted(self.buckets.values(), key=lambda b: (b.plan.rows, b.plan.routes is not None), reverse=True)
        for done, bucket in enumerate(ordered, 1):
            self._plan(bucket, None)  # all padding: no KV written, no query row routed
            self.model(*self._inputs(bucket))  # warm-up: lazy initialisation must not happen under capture
            torch.cuda.synchronize()
            with torch.cuda.graph(bucket.graph, pool=pool):
                bucket.hidden = self.model(*self._inputs(bucket))
            if progress is not None:
                progress(done, len(ordered))
        torch.cuda.synchronize()
        log.info(
            "captured %d decode graphs (batch %s%s) in %.1f s",
            len(ordered),
            ", ".join(map(str, self.sizes)),
            ", each with and without CP routes" if len(ordered) > len(self.sizes) else "",
            time.perf_counter() - started,
        )

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """The hidden states of a static step's rows (padding included), by its bucket's graph."""
        return self.run(self.prepare(inputs))

    def prepare(self, inputs: StepInputs) -> _Bucket:
        """Host work before a replay: the step's inputs and tables into its bucket's buffers, the decodes planned."""
        plan = inputs.plan
        assert isinstance(plan, StaticPlan), "a graph replays a static step"
        bucket = self.buckets[(plan.rows, plan.routes is not None)]
        self.token_ids[: plan.rows].copy_(inputs.token_ids)
        self.positions[: plan.rows].copy_(inputs.positions)
        self._plan(bucket, plan)
        return bucket

    def run(self, bucket: _Bucket) -> torch.Tensor:
        """The prepared bucket's replay (or, with `replay` off, the same padded step run eagerly)."""
        if not self.replay:
            return self.model(*self._inputs(bucket))
        assert bucket.hidden is not None, "capture() first"
        bucket.graph.replay()
        self.replays += 1
        return bucket.hidden

    @staticmethod
    def _plan(bucket: _Bucket, step: StaticPlan | None) -> None:
        """Copies the step's slot tables into the bucket's buffers and plans its decodes (None: all padding)."""
        static = bucket.plan
        assert static.decode is not None
        if step is None:
            static.local_slots.fill_(-1)
        else:
            static.local_slots.copy_(step.local_slots)
        static.decode[0].plan(step.local if step is not None else None)
        if static.routes is None:
            return
        assert static.decode[1] is not None
        static.decode[1].plan(step.received if step is not None else None)
        if step is None or step.routes is None:
            static.routes.kv_slots.fill_(-1)  # no K, V row lands anywhere; queries and merges read valid rows
            return
        for mine, theirs in zip(vars(static.routes).values(), vars(step.routes).values(), strict=True):
            mine.copy_(theirs)

    def _inputs(self, bucket: _Bucket) -> tuple[torch.Tensor, StepContext]:
        """The bucket's static inputs, its plan set on the attention backend (what a capture records)."""
        self.attention.plan = bucket.plan
        rows = bucket.plan.rows
        context = StepContext(self.positions[:rows], self.attention, bucket.moe_capacity)
        return self.token_ids[:rows], context
