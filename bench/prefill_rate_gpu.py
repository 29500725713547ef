"""The engine's prefill rate as bench/gpu_decode_step.py takes it, alone, to compare two commits in one lease:
Qwen3-30B-A3B shapes with random bf16 weights, chunks of up to 16K tokens, each prompt then decoding (up to 512
tokens) beside the later prompts' chunks; timed from an idle engine until the last prompt is prefilled, the second
time round.
It uses only the engine API every commit since issue 16 was filed has, so the baseline runs with its own nanocp
first on PYTHONPATH:

    mkdir base && git archive 90059fe nanocp | tar -x -C base  # the commit before issue 16's first change
    PYTHONPATH=base python3 bench/prefill_rate_gpu.py --label base-90059fe --out DIR
    python3 bench/prefill_rate_gpu.py --label head --out DIR

Writes DIR/prefill_rate_gpu_<label>.json (default DIR: bench/results).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import nanocp
from nanocp.model_config import load_model_config
from nanocp.worker.engine import Engine, EngineConfig
from nanocp.worker.request import SamplingParams
from nanocp.worker.weights import build_model

RESULTS = Path(__file__).parent / "results"
PAGE, MAX_TOKENS, STEP_TOKENS = 16, 512, 16384  # bench/gpu_decode_step.py's


def seconds_to_prefill(engine: Engine) -> float:
    """Steps the engine until no prompt is left to prefill and the device has run those steps: the seconds taken."""
    started = time.perf_counter()
    while engine.scheduler.waiting or any(r.prefilling for r in engine.scheduler.running):
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def end_all(engine: Engine) -> None:
    """Ends every request and steps until the engine is idle."""
    for request_id in list(engine.requests):
        engine.abort(request_id)
    while engine.scheduler.waiting or engine.scheduler.running:
        engine.step()
    torch.cuda.synchronize()


def prefill_seconds(engine: Engine, prompts: list[list[int]], label: str) -> float:
    """Seconds from adding the prompts to an idle engine until the last is prefilled; then every request ends."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{label}-{i}", prompt, params, lambda _: None)
    seconds = seconds_to_prefill(engine)
    end_all(engine)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="names the results file")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = replace(load_model_config("qwen3-30b-a3b", dtype="bfloat16"), max_context=args.context + 2 * MAX_TOKENS)
    model = build_model(config, "cuda", seed=0)
    engine_config = EngineConfig(
        page_size=PAGE,
        num_pages=args.prompts * -(-(args.context + MAX_TOKENS) // PAGE),
        max_step_tokens=STEP_TOKENS,
        max_running=max(args.prompts, 256),
        device="cuda",
        dtype="bfloat16",
    )
    engine = Engine(config, model, engine_config)
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(0, config.vocab_size, (args.context,), generator=generator).tolist() for _ in range(args.prompts)
    ]
    # The same prefill twice: the first builds what its shapes need (Triton's JIT, the allocator's blocks) as
    # gpu_decode_step.py's earlier points have by the time it prefills; the second is timed.
    warm_up = prefill_seconds(engine, prompts, "warm-up")
    seconds = prefill_seconds(engine, prompts, "timed")
    rate = args.prompts * args.context / seconds
    result = {
        "label": args.label,
        "nanocp": nanocp.__file__,
        "device": torch.cuda.get_device_name(),
        "context": args.context,
        "prompts": args.prompts,
        "warm_up_seconds": warm_up,
        "seconds": seconds,
        "tokens_per_s": rate,
    }
    print(json.dumps(result), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"prefill_rate_gpu_{args.label}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
