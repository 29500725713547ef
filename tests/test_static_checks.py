"""checkov, pinned (Makefile), finds nothing in the rendered chart (with its options on and off) nor in the
Dockerfile: every finding is fixed, or skipped in .checkov.yaml or the Dockerfile with its reason."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_helm_chart import CHART, HELM, ROOT, helm

CHECKOV = ROOT / ".venv" / "checkov" / "bin" / "checkov"
pytestmark = pytest.mark.skipif(
    HELM is None or not CHECKOV.exists(), reason="no helm or checkov: `make test` installs both into .venv"
)


def checkov(*files: Path) -> subprocess.CompletedProcess[str]:
    args = [a for f in files for a in ("--file", str(f))]
    command = [str(CHECKOV), "--config-file", str(ROOT / ".checkov.yaml"), *args]
    # BC_SKIP_MAPPING: nothing is fetched from checkov's vendor (the machines may be offline)
    environment = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)


@pytest.mark.timeout(900)
def test_checkov_passes_the_rendered_chart_and_the_dockerfile(tmp_path: Path) -> None:
    files = []
    for values in ("default", "security", "no-rdma", "lws"):
        rendered = helm("template", "r", str(CHART), "--values", str(CHART / "ci" / f"{values}-values.yaml"))
        assert rendered.returncode == 0, rendered.stderr
        files.append(tmp_path / f"{values}.yaml")
        files[-1].write_text(rendered.stdout)
    result = checkov(*files, ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Passed checks" in result.stdout  # it did check something


@pytest.mark.timeout(900)
def test_checkov_reports_what_the_chart_fixed(tmp_path: Path) -> None:
    """The check is live: a pod without the chart's securityContext fails it."""
    rendered = helm("template", "r", str(CHART)).stdout
    unhardened = tmp_path / "unhardened.yaml"
    unhardened.write_text(rendered.replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false"))
    result = checkov(unhardened)
    assert result.returncode != 0 and "CKV_K8S_22" in result.stdout
