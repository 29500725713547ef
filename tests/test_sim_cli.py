"""`nanocp sim`: a run of a generated mix prints its figures; calibrate refits the committed coefficients."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from nanocp.cli import main
from nanocp.sim.calibration import RESULTS
from nanocp.sim.data import calibration_path

SOURCES = (
    "cp_attention_split.json",
    "moe_kernels.json",
    "gpu_decode_step.json",
    "sim_cpu_steps.json",
    "group_step_breakdown.json",
)


def test_sim_run_simulates_a_generated_mix_and_prints_latency_and_attainment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["sim", "run", "--mix", "--requests", "300", "--instances", "4", "--rate", "4", "--policy", "uniform:2"])
    out = capsys.readouterr().out
    assert "uniform D=2" in out and "tpot_p50_ms" in out and "attainment" in out
    assert "300" in out  # every request accounted for


def test_sim_calibrate_refits_the_committed_coefficients_from_the_committed_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in SOURCES:
        shutil.copy(RESULTS / name, tmp_path / name)
    main(["sim", "calibrate", "--results", str(tmp_path), "--out", str(tmp_path)])
    for kind in ("gpu", "cpu"):
        refit = json.loads((tmp_path / f"sim_calibration_{kind}.json").read_text())
        committed = json.loads(calibration_path(kind).read_text())
        assert refit["coefficients"] == pytest.approx(committed["coefficients"], rel=1e-9), kind
        assert refit["link"] == committed["link"] or all(
            refit["link"][k] == pytest.approx(v, rel=1e-9) for k, v in committed["link"].items() if k != "name"
        ), kind
