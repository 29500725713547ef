"""Decode tokens/s of the nanocp engine against transformers generate, same shapes, batch and run.

Decode time is taken as T(N new tokens) - T(1 new token) for each side, so prefill and set-up cancel out. Two model
choices: `small`, a random checkpoint that both load (float32, the CPU default), and `qwen3-30b-a3b`, the real
shapes in bf16 with random weights drawn by each side (same shapes, different values: the speed does not depend on
them; the two models never share the GPU, which holds one copy of 61 GB at a time). On a GPU the engine replays CUDA
graphs for its decode steps. Writes bench/results/engine_vs_transformers[_DEVICE].json and, where matplotlib is, a
plot beside it.

    .venv/bin/python bench/engine_vs_transformers.py [--batches 1 8 32] [--new-tokens 64]
    python3 bench/engine_vs_transformers.py --device cuda --model qwen3-30b-a3b --prompt-tokens 1024 \
        --kind nvidia-h100-x1
    python3 bench/engine_vs_transformers.py --plot bench/results/engine_vs_transformers_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from nanocp.checkpoint import write_random_checkpoint
from nanocp.model_config import load_model_config
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


def hf_model(model: str, checkpoint: Path, device: str) -> Qwen3MoeForCausalLM:
    if model == "small":
        return Qwen3MoeForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    c = load_model_config(model)
    config = Qwen3MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        moe_intermediate_size=c.expert_width,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        num_experts=c.num_experts,
        num_experts_per_tok=c.experts_per_token,
        norm_topk_prob=c.norm_topk_prob,
        max_position_embeddings=c.max_context,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
    )
    with torch.device(device):
        return Qwen3MoeForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def nanocp_engine(model: str, checkpoint: Path, device: str, max_batch: int) -> Engine:
    spec, dtype = (str(checkpoint), None) if model == "small" else (model, "bfloat16")
    config = EngineConfig(
        page_size=16, num_pages=4096, max_step_tokens=16384, max_running=max_batch, device=device, dtype=dtype
    )
    return Engine.from_spec(spec, config)


def measure(
    run: Callable[[torch.Tensor, int], None], prompts: dict[int, torch.Tensor], args: argparse.Namespace
) -> dict[int, float]:
    """Decode tokens/s by batch."""
    return {
        batch: batch * (args.new_tokens - 1) / decode_seconds(partial(run, p), args.new_tokens, args.repeats)
        for batch, p in track(prompts.items(), description="batch sizes")
    }


def measure_transformers(
    args: argparse.Namespace, checkpoint: Path, prompts: dict[int, torch.Tensor]
) -> dict[int, float]:
    """Builds transformers' model, measures it, and lets it go: one model on the device at a time (the 30B shapes fill
    a GPU once)."""
    hf = hf_model(args.model, checkpoint, args.device)
    return measure(lambda p, n: hf_generate(hf, p.to(args.device), n), prompts, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["small", "qwen3-30b-a3b"], default="small")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kind", default="", help="the device kind it runs on, recorded in the results")
    parser.add_argument("--out", type=Path, help="default bench/results/engine_vs_transformers[_DEVICE].json")
    parser.add_argument("--plot", type=Path, help="only plot this results file")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text())["rows"], args.plot.with_suffix(".png"))
        return
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    out = args.out or RESULTS / f"engine_vs_transformers{suffix}.json"

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_random_checkpoint(Path(tmp), seed=0) if args.model == "small" else Path(tmp)
        vocab = 512 if args.model == "small" else load_model_config(args.model).vocab_size
        prompts = {b: torch.randint(0, vocab, (b, args.prompt_tokens)) for b in args.batches}
        theirs = measure_transformers(args, checkpoint, prompts)
        gc.collect()  # transformers' model must be gone before the engine's is built
        if args.device != "cpu":
            torch.cuda.empty_cache()
        engine = nanocp_engine(args.model, checkpoint, args.device, max(args.batches))
        ours = measure(partial(engine_generate, engine), prompts, args)
    rows = [
        {
            "batch": b,
            "nanocp_tokens_per_s": ours[b],
            "transformers_tokens_per_s": theirs[b],
            "ratio": ours[b] / theirs[b],
        }
        for b in args.batches
    ]
    result = {
        "benchmark": "decode tokens/s, nanocp engine vs transformers generate (greedy)",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "kind": args.kind,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": "random Qwen3-MoE from nanocp.checkpoint.SMALL (float32), both load it"
        if args.model == "small"
        else f"{args.model} shapes, random bf16 weights drawn by each side",
        "cuda_graphs": engine.runner.graphs is not None,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError:
        print("no matplotlib here: plot later with --plot")
    table = Table("batch", "nanocp tok/s", "transformers tok/s", "nanocp / transformers", title=result["benchmark"])
    for row in rows:
        table.add_row(
            str(row["batch"]),
            f"{row['nanocp_tokens_per_s']:.0f}",
            f"{row['transformers_tokens_per_s']:.0f}",
            f"{row['ratio']:.2f}x",
        )
    Console().print(table)
    print(f"wrote {out}")


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
