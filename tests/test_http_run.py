"""`nanocp run --serve`: the README's way to try the HTTP API, with the openai client and a raw SSE stream against the
router it starts, until Ctrl-C stops every process."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai

from nanocp.harness.offline_group import free_port


def wait_for_line(lines: queue.Queue[str], words: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if words in line:
            return line
    raise AssertionError(f"no line with {words!r} within {timeout:.0f} s; got:\n{''.join(seen)[-3000:]}")


def test_nanocp_run_serves_the_openai_api_until_ctrl_c() -> None:
    port = free_port()
    command = [sys.executable, "-m", "nanocp", "run", "--workers", "1", "--requests", "1", "--serve"]
    command += ["--http-port", str(port)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env
    ) as run:
        assert run.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in run.stdout or ()], daemon=True).start()
        try:
            serving = wait_for_line(lines, "serving:", timeout=240)
            assert f"http://127.0.0.1:{port}/v1" in serving
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            out = client.completions.create(model="tiny", prompt="Hi", max_tokens=5, extra_body={"ignore_eos": True})
            assert out.usage is not None and out.usage.completion_tokens == 5
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as sse:
                assert sse.read().decode().endswith("data: [DONE]\n\n")
            run.send_signal(signal.SIGINT)
            wait_for_line(lines, "back to empty", timeout=60)
            assert run.wait(timeout=60) == 0
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    try:
        os.killpg(run.pid, 0)
    except ProcessLookupError:
        return
    os.killpg(run.pid, signal.SIGKILL)
    raise AssertionError("nanocp run left processes in its process group")
