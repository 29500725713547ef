"""An engine's settings, checked when made."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 1024
    max_step_tokens: int = 512  # per-step token budget shared by decodes and prefill chunks
    max_running: int = 64
    device: str = "cpu"
    seed: int = 0  # random weights of presets, and samplers of requests that give no seed
    dtype: str | None = None  # overrides the model's dtype
    cuda_graphs: bool = True  # decode steps of a lone instance replay graphs captured at start-up, where supported
    graph_max_batch: int = 256  # the largest batch graphed (capped by max_running); larger batches run eagerly
    # Decode steps laid out at the graph buckets' shapes even where no graph replays them (CPU): the layout a replay
    # computes, run eagerly, which is how CPU groups test it. Implied by cuda_graphs on a CUDA device.
    static_decode: bool = False
    # Overlap scheduling: the host plans and launches step n+1 while the device runs step n, and reads step n's
    # tokens after (SGLang's overlap scheduler). None: on for CUDA, where the device runs apart from the host; on
    # CPU the device is the host, so there is nothing to overlap.
    overlap: bool | None = None

    def __post_init__(self) -> None:
        for name in ("page_size", "num_pages", "max_step_tokens", "max_running", "graph_max_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_running > self.max_step_tokens:
            raise ValueError(f"max_running ({self.max_running}) exceeds max_step_tokens ({self.max_step_tokens})")
