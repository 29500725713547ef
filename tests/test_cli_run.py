"""`nanocp run` (what `make run` does) and `nanocp generate`, as a user runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from conftest import Cluster

from nanocp.embedded import Stream, has_random_weights, latest_output


def test_nanocp_run_streams_a_mixed_workload_and_leaves_no_process_behind() -> None:
    command = [sys.executable, "-m", "nanocp", "run", "--requests", "4", "--long-every", "2", "--long-tokens", "600"]
    command += ["--http-port", "0"]  # no HTTP API: port 8000 may be taken here (tests/test_http_run.py serves it)
    # Its own process group, so anything it leaves behind can be found afterwards.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # traces go to the run's own receiver
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    ) as run:
        out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err[-2000:]
    for expected in ("short-0", "long-1", "TTFT ms", "TPOT ms", "peak home batch", "stragglers", "back to empty"):
        assert expected in out
    assert "weights are random, so its text is noise" in out and "latest token ids" in out
    # The traces the processes sent to the run's own OTLP receiver: group steps naming their slowest instance.
    assert "straggler traces" in out and "requests it slowed" in out
    try:
        os.killpg(run.pid, 0)
    except ProcessLookupError:
        return
    os.killpg(run.pid, signal.SIGKILL)
    raise AssertionError("nanocp run left processes in its process group")


def test_the_streaming_table_shows_token_ids_of_random_weights_and_escaped_text_of_real_ones() -> None:
    stream = Stream("s", "prompt", 10, text="ab\ncd\x07", token_ids=list(range(10)))
    assert has_random_weights("tiny")
    assert latest_output(stream, random_weights=True) == "2 3 4 5 6 7 8 9", "the last eight"
    assert latest_output(stream, random_weights=False) == "ab\\ncd\\x07"


async def nanocp(*args: str) -> tuple[int, str, str]:
    """Runs the CLI without blocking the event loop that serves the in-process cluster."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanocp", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_nanocp_generate_prints_the_stream_and_its_finish(cluster: Cluster) -> None:
    code, out, err = await nanocp("generate", "--router", cluster.address, "hello", "--max-tokens", "5")
    assert code == 0, err
    assert "[length:" in out or "[stop:" in out


async def test_nanocp_generate_reports_bad_input_with_the_status_and_exits_non_zero(cluster: Cluster) -> None:
    code, _, err = await nanocp("generate", "--router", cluster.address, "hi", "--top-p", "1.5")
    assert code != 0
    assert "INVALID_ARGUMENT" in err and "top_p" in err
    assert not (await cluster.client.list_instances()).requests, "the refused request left nothing live"
