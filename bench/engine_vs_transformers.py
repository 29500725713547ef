"""Decode tokens/s of the nanocp engine against transformers generate, same checkpoint, batch and run.

Decode time is taken as T(N new tokens) - T(1 new token) for each side, so prefill and set-up cancel out.
Writes bench/results/engine_vs_transformers.json and a plot beside it.

    .venv/bin/python bench/engine_vs_transformers.py [--batches 1 8 32] [--new-tokens 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import Qwen3MoeForCausalLM

from nanocp.checkpoint import write_random_checkpoint
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams

RESULTS = Path(__file__).parent / "results"


def engine_generate(engine: Engine, prompts: torch.Tensor, new_tokens: int) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"r{i}", prompt, params, lambda _: None)
    while engine.has_work():
        engine.step()


def hf_generate(model: Qwen3MoeForCausalLM, prompts: torch.Tensor, new_tokens: int) -> None:
    with torch.inference_mode():
        model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def decode_seconds(run: Callable[[int], None], new_tokens: int, repeats: int) -> float:
    """Median over repeats of T(new_tokens) - T(1)."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        run(n)
        return time.perf_counter() - start

    run(2)  # warm-up
    return statistics.median(timed(new_tokens) - timed(1) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "engine_vs_transformers.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(Path(tmp), seed=0)
        hf = Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(args.device).eval()
        config = EngineConfig(page_size=16, num_pages=2048, max_step_tokens=4096, max_running=max(args.batches))
        engine = Engine.from_spec(str(checkpoint), config)
        rows = []
        for batch in track(args.batches, description="batch sizes"):
            prompts = torch.randint(0, engine.model_config.vocab_size, (batch, args.prompt_tokens))
            tokens = batch * (args.new_tokens - 1)
            ours = decode_seconds(partial(engine_generate, engine, prompts), args.new_tokens, args.repeats)
            theirs = decode_seconds(partial(hf_generate, hf, prompts.to(args.device)), args.new_tokens, args.repeats)
            rows.append(
                {
                    "batch": batch,
                    "nanocp_tokens_per_s": tokens / ours,
                    "transformers_tokens_per_s": tokens / theirs,
                    "ratio": theirs / ours,
                }
            )
    result = {
        "benchmark": "decode tokens/s, nanocp engine vs transformers generate (greedy, same checkpoint)",
        "device": args.device,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "checkpoint": "random Qwen3-MoE from nanocp.checkpoint.SMALL (float32)",
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    table = Table("batch", "nanocp tok/s", "transformers tok/s", "ratio", title=result["benchmark"])
    for row in rows:
        table.add_row(
            str(row["batch"]),
            f"{row['nanocp_tokens_per_s']:.0f}",
            f"{row['transformers_tokens_per_s']:.0f}",
            f"{row['ratio']:.2f}x",
        )
    Console().print(table)
    print(f"wrote {args.out}")


def plot(rows: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(r["batch"]) for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [r["nanocp_tokens_per_s"] for r in rows], 0.4, label="nanocp")
    ax.bar([i + 0.2 for i in x], [r["transformers_tokens_per_s"] for r in rows], 0.4, label="transformers")
    ax.set_xticks(list(x), batches)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
