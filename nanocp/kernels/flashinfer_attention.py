"""Paged attention on CUDA through FlashInfer, behind the kernels/ interface.

Single-row segments (decodes) run in FlashInfer's FlashAttention-2 kernels over the paged cache, as its tensor-core
decode does; multi-row segments (prefill chunks, several routed queries of one request) in its FlashAttention-3
kernels on Hopper, causal or not. Both plan through its batch prefill wrapper, which takes every table the host
gives it from page-locked memory: its decode wrapper copies a query index of its own from pageable memory, and such a
copy makes the host wait for the stream (no overlap). A causal segment whose keys are all its own rows' (a prompt's
first chunk) reads them from the rows' K, V when the caller passes them, as ragged tensors: dense, so
FlashAttention-3 loads them by TMA, 16% faster than through pages (results/prefill_attention_gpu.json: 1.82 vs 2.18 ms
for two 8K prompts on an H200). FlashInfer writes log-sum-exp in base 2; it is converted to the interface's natural
log here. CUDA graphs plan decodes through its decode wrapper (GraphDecode), whose graph mode copies nothing from
pageable memory.

A step's metadata is planned once (plan() runs on the host) and every layer reuses the plan. Wrappers are costly to
make (workspaces, pinned buffers), so they live in a pool per device: a metadata borrows one wrapper per kind and
hands it back when it is garbage-collected, so several metadata objects of one step (local and routed queries) keep
their own plans. CUDA graphs use GraphDecode instead: a wrapper of a fixed batch, planned on the host before each
replay into buffers the captured kernels read.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from nanocp.kernels.attention import AttentionMetadata

LN2 = math.log(2.0)
PAD_PAGE = 0  # the page a graph's padding rows attend (one token each); their outputs are dropped
# FlashInfer's recommended split-k scratch, one per device and shared by all wrappers: safe while attention runs on
# one stream; attention overlapped on a second stream needs wrappers with a workspace of their own.
WORKSPACE_BYTES = 128 << 20
BACKEND = "fa2"  # one JIT module serves both tensor-core decode and paged prefill


def prefill_backend(device: torch.device) -> str:
    """FlashAttention-3's kernels (warp-specialised, TMA) for prefill chunks on Hopper, where a long prompt's
    attention is compute-bound; FlashAttention-2's elsewhere."""
    return "fa3" if torch.cuda.get_device_capability(device)[0] == 9 else BACKEND


@dataclass(frozen=True)
class _Launch:
    wrapper: Reusable
    rows: slice | torch.Tensor  # the query rows it computes: a slice when contiguous, so it writes in place
    own_keys: bool = False  # reads the rows' own K, V (ragged) instead of the paged cache


@dataclass(frozen=True)
class _Plan:
    launches: list[_Launch]
    rows_covered: int  # rows of segments with keys; the other rows are o = 0, lse = -inf


_workspaces: dict[torch.device, torch.Tensor] = {}
_pools: dict[tuple[torch.device, str], list[Reusable]] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    if device not in _workspaces:
        _workspaces[device] = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)  # zeroed at first use
    return _workspaces[device]


class Reusable:
    """A FlashInfer wrapper planned again and again. plan() fills a page-locked buffer of the wrapper's and queues
    its copy to the device without waiting; the host may run a step ahead of the device, so the next plan() first
    waits until that copy has run rather than overwrite the buffer under it (it has long run, but nothing else
    says so)."""

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper
        self._copied = torch.cuda.Event()

    def plan(self, *args: Any, **kwargs: Any) -> None:
        self._copied.synchronize()
        self.wrapper.plan(*args, **kwargs)
        self._copied.record()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapper.run(*args, **kwargs)


def _take_wrapper(device: torch.device, kind: str) -> Reusable:
    pool = _pools.setdefault((device, kind), [])
    if pool:
        return pool.pop()
    import flashinfer

    workspace = _workspace(device)
    backend = BACKEND if kind == "decode" else prefill_backend(device)
    if kind == "own keys":
        return Reusable(flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend=backend))
    return Reusable(flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD", backend=backend))


def _give_back(device: torch.device, kind: str, wrapper: Reusable) -> None:
    _pools[(device, kind)].append(wrapper)


def _rows(meta: AttentionMetadata, segments: list[int], device: torch.device) -> slice | torch.Tensor:
    ranges = [(meta.qo_indptr[b], meta.qo_indptr[b + 1]) for b in segments]
    if all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1)):
        return slice(ranges[0][0], ranges[-1][1])
    return pinned([r for start, end in ranges for r in range(start, end)]).to(device, non_blocking=True)


def page_table(
    meta: AttentionMetadata | None, segments: list[int], device: torch.device, padding: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashInfer's page table for the segments: (indptr, indices, last_page_len), with exactly the pages that hold
    each segment's keys (a segment may list more), then `padding` rows that each attend one token of `PAD_PAGE`.
    indptr and last_page_len stay on the host, where plan() reads them, in page-locked memory: plan() also copies
    them to the device, and a copy from pageable memory synchronises the stream, so the host would wait for the step
    in flight (no overlap). indices go to the device."""
    counts, starts, last = [], [], []
    if meta is not None:
        size = meta.page_size
        counts = [-(-meta.kv_lens[b] // size) for b in segments]
        starts = [meta.page_indptr[b] for b in segments]
        last = [meta.kv_lens[b] - (n - 1) * size for b, n in zip(segments, counts, strict=True)]
    indptr = list(accumulate(counts + [1] * padding, initial=0))
    pages = indptr[len(counts)]
    if meta is None or not segments:
        indices = torch.zeros(0, dtype=torch.int32, device=device)
    elif all(s - starts[0] == i for s, i in zip(starts, indptr, strict=False)):
        indices = meta.page_indices[starts[0] : starts[0] + pages]
    else:  # gather each segment's first pages in one indexing op
        shift = torch.repeat_interleave(
            torch.tensor(starts) - torch.tensor(indptr[: len(starts)]), torch.tensor(counts)
        )
        positions = torch.arange(pages) + shift
        indices = meta.page_indices[positions.pin_memory().to(meta.page_indices.device, non_blocking=True)]
    indices = indices.to(device=device, dtype=torch.int32)
    if padding:
        indices = torch.cat((indices, indices.new_full((padding,), PAD_PAGE)))
    return pinned(indptr), indices, pinned(last + [1] * padding)


def pinned(values: list[int]) -> torch.Tensor:
    """Host int32 values in page-locked memory, so that a copy to the device does not wait for the stream."""
    return torch.tensor(values, dtype=torch.int32).pin_memory()


def _plan(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor, scale: float, own_keys: bool) -> _Plan:
    num_heads, dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    key = ("flashinfer", q.device, q.dtype, k_cache.dtype, num_heads, num_kv_heads, dim, scale, own_keys)
    plan: _Plan | None = meta.backend_plans.get(key)
    if plan is not None:
        return plan
    singles: list[int] = []
    multis: list[int] = []
    owns: list[int] = []
    for b in range(meta.num_segments):
        rows = meta.qo_indptr[b + 1] - meta.qo_indptr[b]
        if rows > 0 and meta.kv_lens[b] > 0:
            # Causal with as many keys as rows: the keys are the rows' own, row for row.
            fresh = own_keys and meta.causal and rows == meta.kv_lens[b]
            (singles if rows == 1 else owns if fresh else multis).append(b)
    dtypes = {"q_data_type": q.dtype, "kv_data_type": k_cache.dtype, "sm_scale": scale}
    launches = []
    # One query row attends all its keys: causal or not alike, so decodes plan without the causal mask.
    kinds = (("decode", singles, False), ("prefill", multis, meta.causal), ("own keys", owns, True))
    for kind, segments, causal in kinds:
        if not segments:
            continue
        wrapper = _take_wrapper(q.device, kind)
        qo_indptr = pinned(list(accumulate((meta.qo_indptr[b + 1] - meta.qo_indptr[b] for b in segments), initial=0)))
        if kind == "own keys":
            wrapper.plan(qo_indptr, qo_indptr, num_heads, num_kv_heads, dim, causal=True, **dtypes)
        else:
            indptr, indices, last = page_table(meta, segments, q.device)
            # The key counts given, pinned: FlashInfer would derive them in pageable memory and copy them from
            # there. Its causal mask aligns a segment's queries with its last keys, as the interface says.
            wrapper.plan(
                qo_indptr, indptr, indices, last, num_heads, num_kv_heads, dim, meta.page_size,
                causal=causal, seq_lens=pinned([meta.kv_lens[b] for b in segments]), **dtypes,
            )  # fmt: skip
        launches.append(_Launch(wrapper, _rows(meta, segments, q.device), own_keys=kind == "own keys"))
        weakref.finalize(meta, _give_back, q.device, kind, wrapper)
    covered = sum(meta.qo_indptr[b + 1] - meta.qo_indptr[b] for b in singles + multis + owns)
    plan = _Plan(launches, covered)
    meta.backend_plans[key] = plan
    return plan


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    own_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kernels.paged_attention on CUDA (bf16 or fp16)."""
    own_keys = own_kv is not None and own_kv[0].dtype == k_cache.dtype  # the same values as the cache holds
    # Pooled wrappers serve callers in and out of inference mode (the engine, and code that runs kernels directly):
    # the buffers plan() makes and updates must be normal tensors, which either kind of caller may update.
    with torch.inference_mode(False):
        plan = _plan(meta, q, k_cache, scale, own_keys)
    if plan.rows_covered == q.shape[0]:
        out, lse = torch.empty_like(q), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for launch in plan.launches:
        rows = launch.rows
        keys = (own_kv[0][rows], own_kv[1][rows]) if launch.own_keys and own_kv else ((k_cache, v_cache),)
        if isinstance(rows, slice):
            launch.wrapper.run(q[rows], *keys, out=out[rows], lse=lse[rows], return_lse=True)
        else:
            o, s = launch.wrapper.run(q[rows], *keys, return_lse=True)
            out[rows] = o
            lse[rows] = s
    return out, lse.mul_(LN2)


class GraphDecode:
    """Batch decode of a fixed number of rows for a CUDA graph: the plan's tables live in buffers the captured
    kernels read, so each replay runs on the step planned just before it.

    A step with fewer rows than the graph pads the rest: each padding row attends one token of `PAD_PAGE`, and its
    output is dropped by the caller.
    """

    def __init__(
        self, rows: int, max_pages: int, plan_args: dict[str, Any], device: torch.device, split_kv: bool | None = None
    ) -> None:
        """plan_args: num_qo_heads, num_kv_heads, head_dim, page_size and the dtypes and scale, as plan() takes them.
        Tensor cores at every batch: FlashInfer's CUDA-core decode is faster at a 16-token context (12.2 vs 16.2
        us a graph replay at 1 row) but slower from 1K (22.9 vs 17.9; results/decode_kernels_gpu.json of e775ff1).
        split_kv: whether FlashInfer may split a row's KV across CTAs; fixed for the wrapper's life (a captured
        graph has the merge kernel or not). None: only where a split can happen (`can_split`)."""
        import flashinfer

        self.rows = rows
        self.plan_args = plan_args
        self.split_kv = self.can_split(rows, plan_args["num_kv_heads"], device) if split_kv is None else split_kv
        self.device = device
        self.wrapper = Reusable(
            flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                _workspace(device),
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=torch.zeros(rows + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(max_pages + rows, dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(rows, dtype=torch.int32, device=device),
                backend=BACKEND,
            )
        )

    @staticmethod
    def can_split(rows: int, num_kv_heads: int, device: torch.device) -> bool:
        """Whether FlashInfer's graph decode can split any row's KV at this many rows. Under CUDA graphs it plans a
        split at every step (partials in the workspace, then a merge kernel), but its chunks number at most
        2 * SMs / kv_heads (66 on an H200 with 4 KV heads), one a row at least: from there on it splits nothing and
        the partials and the merge only cost (4 to 8 us a layer at 80 to 256 rows of 1K on an H200;
        results/decode_kernels_gpu_split_h200.json). Below, a split can pay a lot: 64 rows, one of 64K tokens and
        63 of 1K, take 303 us with it and 887 us without."""
        return rows * num_kv_heads < 2 * torch.cuda.get_device_properties(device).multi_processor_count

    def plan(self, meta: AttentionMetadata | None) -> None:
        """Plans the segments of `meta` (one row each, in row order; None: none) and pads to the graph's rows."""
        segments = list(range(meta.num_segments)) if meta is not None else []
        indptr, indices, last = page_table(meta, segments, self.device, self.rows - len(segments))
        with torch.inference_mode(False):  # the wrapper's buffers are normal tensors, updated in place
            self.wrapper.plan(indptr, indices, last, disable_split_kv=not self.split_kv, **self.plan_args)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (rows, heads, dim); the output and log-sum-exp (natural log) of every row, padding rows included."""
        out, lse = self.wrapper.run(q, (k_cache, v_cache), return_lse=True)
        return out, lse.mul_(LN2)

    def output(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """run's output alone, for rows with no other partial to merge with: no log-sum-exp written or scaled."""
        return self.wrapper.run(q, (k_cache, v_cache))
