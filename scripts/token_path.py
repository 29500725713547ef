"""The files one CP request's token passes through: SDK -> router -> home worker -> holder worker -> merge -> sample
-> stream, measured rather than listed by hand.

It starts a router (dcp with small shards, so a long prompt splits over both instances) and a decode group of two
CPU workers on the tiny model, each with scripts/token_path_hook on its PYTHONPATH, so that each records the
functions it runs between two signals (call_windows.py: cProfile in every thread); this process records its own.
It records an idle window first, before any request (heartbeats, load polls, the engine's idle checks: background),
then a window around each of three requests placed at CP degree 2, sent through the SDK: a warm-up (first-time work:
lazy imports, caches) and two measured. Every window ends by waiting until each KV page is free again. A file is on
a stage's path when a function of it ran in that stage's process for both measured requests and never while idle:
work a busy machine adds to one window only (a heartbeat that timed out, say) stays out.

    .venv/bin/python scripts/token_path.py [--max-files N]   # exits 1 when the path spans more than N files
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from rich.console import Console

from nanocp.client import Client, NanocpError
from nanocp.harness.cp_streams import SPLIT_PAYS
from nanocp.local_cluster import local_cluster
from nanocp.v1 import router_pb2

ROOT = Path(__file__).resolve().parents[1]
HOOK = Path(__file__).resolve().parent / "token_path_hook"
GENERATED = ("nanocp/v1/", "nanocp/internal/")
STAGES = ("SDK", "router", "home worker", "holder worker")
PROMPT_TOKENS = 200  # over three shards of SHARD_TOKENS: the dcp router splits it over both instances
SHARD_TOKENS = 64
MAX_TOKENS = 8
SETTLE_TIMEOUT_S = 60.0
IDLE_S = 2.5  # the idle window: two of the router's 1 s heartbeats and the engine's once-a-second idle check
SETTLE_S = 0.3  # after the last page is free, for calls still returning (a holder frees a step after its home)
ATTEMPTS = 5  # requests to try for the two windows; on a starved machine a heartbeat can time out and fail one
ANSWER_TIMEOUT_S = 30.0
Function = tuple[str, int, str]  # file, first line, name: as call_windows.py records them
T = TypeVar("T")


def _load_call_windows() -> ModuleType:
    """The recorder the child processes load through sitecustomize, loaded here from the same file."""
    spec = importlib.util.spec_from_file_location("call_windows", HOOK / "call_windows.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class TokenPath:
    stages: dict[str, list[str]]  # per stage (STAGES), the nanocp files on the path, relative to the checkout
    placement: str  # where the first measured request went: its home and the instances holding its KV

    def files(self) -> set[str]:
        return {f for files in self.stages.values() for f in files}


@dataclass(frozen=True)
class Served:
    """One request's window: the functions each process ran ("sdk": this one), and where the request was placed."""

    ran: dict[str, set[Function]]
    home: str
    holders: list[str]

    def stages(self, idle: dict[str, set[Function]]) -> dict[str, set[Function]]:
        (holder,) = set(self.holders) - {self.home}
        processes = dict(zip(STAGES, ("sdk", "router", self.home, holder), strict=True))
        return {stage: self.ran[p] - idle[p] for stage, p in processes.items()}


def nanocp_files(functions: set[Function]) -> set[str]:
    """The product files among the functions' files: nanocp/, less the generated gRPC modules."""
    files = set()
    for filename, _, _ in functions:
        path = Path(filename)
        if path.is_relative_to(ROOT / "nanocp"):
            relative = path.relative_to(ROOT).as_posix()
            if not relative.startswith(GENERATED):
                files.add(relative)
    return files


class Recorders:
    """This process's window and the child processes' windows, opened and closed together."""

    def __init__(self, folder: Path, pids: dict[str, int], call_windows: ModuleType) -> None:
        self.folder, self.pids, self.local = folder, pids, call_windows
        self.opened = 0

    def record(self, work: Callable[[], T]) -> tuple[T, dict[str, set[Function]]]:
        """What `work` returned, and the functions that ran in each process (by name; "sdk": this one) meanwhile. If
        `work` raises, the windows close all the same and the exception goes on."""
        window = self.opened
        self.opened += 1
        self._signal(signal.SIGUSR1, ".open", window)
        self.local.open_window()
        try:
            result = work()
        finally:
            ran = {"sdk": self.local.close_window()}
            answers = self._signal(signal.SIGUSR2, ".json", window)
        for name, path in answers.items():
            ran[name] = {(f, line, function) for f, line, function in json.loads(path.read_text())}
        return result, ran

    def _signal(self, signum: int, suffix: str, window: int) -> dict[str, Path]:
        """Signals every child, then waits for each one's answer file (its handler ran)."""
        for pid in self.pids.values():
            os.kill(pid, signum)
        answers = {name: self.folder / f"{pid}.{window}{suffix}" for name, pid in self.pids.items()}
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        while not all(path.exists() for path in answers.values()):
            if time.monotonic() > deadline:
                silent = [name for name, path in answers.items() if not path.exists()]
                raise TimeoutError(f"no answer to signal {signum} from {silent}")
            time.sleep(0.01)
        return answers


def wait_until_settled(client: Client) -> None:
    """Until every instance is ready and holds no KV page, and a little after."""
    ready = router_pb2.INSTANCE_STATE_READY
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(i.state != ready or i.kv_pages_in_use or i.kv_pages_committed for i in client.list_instances().instances):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the instances did not settle within {SETTLE_TIMEOUT_S:.0f} s")
        time.sleep(0.02)
    time.sleep(SETTLE_S)


def stay_idle(client: Client) -> None:
    time.sleep(IDLE_S)
    wait_until_settled(client)


def cp_request(client: Client, first_token: int) -> tuple[str, list[str]]:
    """Sends one request long enough for CP degree 2, streams it to its end and waits until its pages are free;
    its home and KV holders."""
    prompt = [(first_token + i) % 256 for i in range(PROMPT_TOKENS)]
    placement = None
    for chunk in client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True):
        placement = placement or chunk.placement
    assert placement is not None, "the router sends the placement first"
    holders = [shard.instance for shard in placement.shards]
    assert len(holders) == 2, f"the request was placed at CP degree {len(holders)}, not 2"
    wait_until_settled(client)
    return placement.home, holders


def serve_requests(client: Client, recorders: Recorders, count: int) -> list[Served]:
    """`count` requests' windows, each request sent once (no SDK retries, whose work would count): a request that
    fails (a starved machine's heartbeat timed out) is replaced by another, up to ATTEMPTS in all."""
    served: list[Served] = []
    for attempt in range(ATTEMPTS):
        try:
            (home, holders), ran = recorders.record(functools.partial(cp_request, client, attempt))
        except NanocpError:
            wait_until_settled(client)
            continue
        served.append(Served(ran, home, holders))
        if len(served) == count:
            return served
    raise RuntimeError(f"{ATTEMPTS - len(served)} of {ATTEMPTS} requests failed; the machine is too busy to measure")


def measure(console: Console | None = None) -> TokenPath:
    """Starts the cluster and records its windows (20 s or so; up to a minute on 2 busy cores)."""
    console = console or Console(quiet=True)
    call_windows = _load_call_windows()
    with call_windows.installed(), tempfile.TemporaryDirectory(prefix="nanocp-token-path-") as folder:
        pythonpath = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": pythonpath, "NANOCP_CALL_WINDOWS": folder}
        cost_model = Path(folder) / "cost_model.json"
        SPLIT_PAYS.save(cost_model)  # so that dcp splits the request
        router_args = ["--policy", "dcp", "--shard-tokens", str(SHARD_TOKENS), "--cost-model", str(cost_model)]
        with (
            local_cluster("tiny", 2, router_args, console, env=env) as cluster,
            Client(cluster.router, max_retries=0) as client,
        ):
            recorders = Recorders(Path(folder), cluster.pids, call_windows)
            wait_until_settled(client)
            _, idle = recorders.record(functools.partial(stay_idle, client))
            # The first request served is the warm-up (first-time work: lazy imports, caches); two more are measured.
            _, first, second = serve_requests(client, recorders, 3)
    both = [s.stages(idle) for s in (first, second)]
    stages = {stage: sorted(nanocp_files(both[0][stage] & both[1][stage])) for stage in STAGES}
    return TokenPath(stages, f"home {first.home}, KV on {','.join(first.holders)}")


def report(path: TokenPath, console: Console) -> None:
    console.print(f"One CP request's token path (tiny model, 2 CPU workers, dcp: {path.placement})")
    for stage, files in path.stages.items():
        console.print(f"{stage} ({len(files)} files)")
        for file in files:
            console.print(f"  {file}")
    console.print(f"total: {len(path.files())} distinct files (a file in several stages counts once)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-files", type=int, default=None, help="fail when the path spans more files")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)  # pipes get whole lines
    path = measure(console)
    report(path, console)
    if args.max_files is not None and len(path.files()) > args.max_files:
        sys.exit(f"the path spans {len(path.files())} files, more than {args.max_files}")


if __name__ == "__main__":
    main()
