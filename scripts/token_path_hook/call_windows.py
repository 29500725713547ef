"""Which functions a process runs between two moments: a C profiler (cProfile) in every thread from the start,
cleared when a window opens and read when it closes.

A window sees the calls that began and returned within it. The profiler runs at C speed: a process under it starts
about a fifth slower and serves at nearly full speed, and opening or closing a window takes milliseconds (reading all
of a worker's counts instead would hold its event loop for a few hundred, long enough to miss a heartbeat).
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import os
import signal
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Function = tuple[str, int, str]  # file, first line, name

_profiles: list[cProfile.Profile] = []
_profiles_lock = threading.Lock()


def install() -> None:
    """Profiles this thread from now on, and every thread started after it."""
    _profile_this_thread()
    threading.setprofile(_profile_new_thread)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """install() for a while, in a process that goes on after: at the end this thread stops profiling and new threads
    start without (threads started meanwhile keep profiling until they end)."""
    profile = _profile_this_thread()
    threading.setprofile(_profile_new_thread)
    try:
        yield
    finally:
        threading.setprofile(None)
        profile.disable()


def _profile_this_thread() -> cProfile.Profile:
    profile = cProfile.Profile()
    with _profiles_lock:
        _profiles.append(profile)
    profile.enable()
    return profile


def _profile_new_thread(frame: types.FrameType, event: str, arg: Any) -> None:
    # threading.Thread sets this as a new thread's profile function; at its first event it hands over to cProfile.
    sys.setprofile(None)
    _profile_this_thread()


def open_window() -> None:
    """Forgets every thread's calls so far. A call already under way when the window opens never counts: its
    thread's profiler forgets the frames on its stack (safe from another thread: a profiler only runs under the GIL)."""
    for profile in _all_profiles():
        profile.clear()


def close_window() -> set[Function]:
    """The Python functions whose calls began and returned since open_window(), over every thread."""
    return {
        (entry.code.co_filename, entry.code.co_firstlineno, entry.code.co_name)
        for profile in _all_profiles()
        for entry in profile.getstats()
        if isinstance(entry.code, types.CodeType) and entry.callcount > 0  # a code object: not a built-in
    }


def _all_profiles() -> list[cProfile.Profile]:
    with _profiles_lock:
        return list(_profiles)


def serve_signals(folder: Path) -> None:
    """For a process another one watches: SIGUSR1 opens window n (counting from 0) and writes <pid>.<n>.open;
    SIGUSR2 closes it and writes its functions to <pid>.<n>.json."""
    install()
    closed = 0

    def on_open(signum: int, frame: types.FrameType | None) -> None:
        open_window()
        _write(folder / f"{os.getpid()}.{closed}.open", "")

    def on_close(signum: int, frame: types.FrameType | None) -> None:
        nonlocal closed
        window, closed = closed, closed + 1  # before the answer: the next signal may come the moment it is written
        _write(folder / f"{os.getpid()}.{window}.json", json.dumps(sorted(close_window())))

    signal.signal(signal.SIGUSR1, on_open)
    signal.signal(signal.SIGUSR2, on_close)


def _write(path: Path, text: str) -> None:
    """Whole or not at all: the watcher reads a file as soon as it appears."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.rename(path)
