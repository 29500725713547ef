"""Installed, not only editable: a wheel built from the tree, installed in a fresh venv outside the checkout, runs
the simulator from another directory on the calibrations and trace it ships (package data).

Offline: the wheel is built with the checkout venv's setuptools (no build isolation, no index), and the fresh venv
sees the checkout venv's dependencies through a .pth line naming its site-packages. A plain path line does not
process the .pth files in that directory, so the checkout's editable nanocp stays out of sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of what the Dockerfile copies (pyproject.toml, README.md, nanocp/ with its generated gRPC
    code), so the build leaves nothing in the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "nanocp", source / "nanocp", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = (sys.executable, "-m", "pip", "--disable-pip-version-check")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", wheels, source, cwd=tmp_path)
    (wheel,) = wheels.glob("nanocp-*.whl")
    return wheel


def fresh_venv(tmp_path: Path) -> Path:
    """A venv without nanocp whose dependencies are the checkout venv's."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (site / "checkout-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def test_a_wheel_installed_in_a_fresh_venv_runs_the_simulator_from_any_directory(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    venv = fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    # The checkout venv's pip, run by the fresh interpreter: it installs there, scripts included.
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet", wheel, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(venv / "bin" / "nanocp", "sim", "run", "--mix", "--requests", "200", cwd=elsewhere)
    assert "attainment" in out and "200" in out
    where = run(python, "-c", "import nanocp.sim.data as d; print(d.__file__); print(d.DATA)", cwd=elsewhere)
    module, data = (Path(line) for line in where.split())
    assert module.is_relative_to(venv) and data.is_relative_to(venv), where
