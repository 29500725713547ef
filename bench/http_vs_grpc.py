"""What the OpenAI-compatible HTTP face costs over gRPC Generate: time to first token and whole-request time of the
same greedy request, through the same router and worker processes, alternating gRPC (the SDK) and HTTP (the
official openai client, streaming) request by request so both see the same machine. Writes
bench/results/http_vs_grpc.json (or --out).

    .venv/bin/python bench/http_vs_grpc.py [--requests 60] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import openai
from rich.console import Console

from nanocp.client import Client
from nanocp.local_cluster import free_ports, local_cluster

RESULTS = Path(__file__).parent / "results"
PROMPT = "Tell me about the moon."


def grpc_request(client: Client, max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    for chunk in client.generate(PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True):
        if chunk.token_ids and not first:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def http_request(client: openai.OpenAI, max_tokens: int) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    stream = client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for _ in stream:
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start


def summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    return {
        "ttft_ms_median": 1000 * statistics.median(s[0] for s in samples),
        "request_ms_median": 1000 * statistics.median(s[1] for s in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per face (default 60)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "http_vs_grpc.json")
    args = parser.parse_args()
    console = Console()
    (http_port,) = free_ports(1)
    with local_cluster("tiny", 1, ["--policy", "static", "--http-port", str(http_port)], console) as cluster:
        faces: dict[str, list[tuple[float, float]]] = {"grpc": [], "http": []}
        with (
            Client(cluster.router) as grpc_client,
            openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0) as http,
        ):
            for _ in range(3):  # warm-up: connections, first steps
                grpc_request(grpc_client, args.max_tokens)
                http_request(http, args.max_tokens)
            for _ in range(args.requests):
                faces["grpc"].append(grpc_request(grpc_client, args.max_tokens))
                faces["http"].append(http_request(http, args.max_tokens))
    result = {
        "what": "greedy tiny-model request, 1 CPU worker, router and worker as local processes, faces alternating",
        "machine": platform.platform(),
        "requests_per_face": args.requests,
        "max_tokens": args.max_tokens,
        "grpc": summary(faces["grpc"]),
        "http": summary(faces["http"]),
    }
    result["http_minus_grpc_ms"] = {
        key: result["http"][key] - result["grpc"][key] for key in ("ttft_ms_median", "request_ms_median")
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print_json(data=result)


if __name__ == "__main__":
    main()
