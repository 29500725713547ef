"""Packs what the GPU device machine lacks to run the service and the transformers benchmark into
.gpu/service.tar.xz: every package nanocp needs at run time (with its dependencies), at the versions installed in
this checkout's venv, as CPython 3.12 manylinux wheels unpacked and compressed. The device already has torch, numpy
and the other packages in ON_DEVICE; FlashInfer comes from ../shared/device/fetch-gpu-wheels.sh (.gpu/site.tar.xz).

    .venv/bin/python scripts/pack_device_site.py          # then carry .gpu, nanocp/v1 and nanocp/internal

On the device, unpack it next to FlashInfer's:

    mkdir -p .gpu/service && xz -dc .gpu/service.tar.xz | tar -xf - -C .gpu/service && \
        export PYTHONPATH=$PWD/.gpu/service:$PYTHONPATH
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = ["nanocp", "transformers"]
# On the device image already (torch 2.11 and what it brings), or not needed there (the Kubernetes client: the
# router on the device uses a static worker list).
ON_DEVICE = {
    "torch", "numpy", "triton", "setuptools", "packaging", "tqdm", "requests", "click", "filelock", "fsspec",
    "typing-extensions", "jinja2", "markupsafe", "sympy", "mpmath", "networkx", "kubernetes", "certifi",
    "charset-normalizer", "idna", "urllib3",
}  # fmt: skip
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
OUT = Path(".gpu/service.tar.xz")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure() -> dict[str, str]:
    """Installed version of every package the roots need on Linux, by canonical name, less ON_DEVICE."""
    found: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        name = canonical(todo.pop())
        if name in found or name in ON_DEVICE or name.startswith("nvidia-"):
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):  # Linux, no extras
                todo.append(requirement.name)
    found.pop("nanocp")  # the checkout itself travels with the call
    return found


def main() -> None:
    packages = closure()
    print(f"packing {len(packages)} packages: {', '.join(f'{n}=={v}' for n, v in sorted(packages.items()))}")
    with tempfile.TemporaryDirectory() as tmp:
        wheels, site = Path(tmp, "wheels"), Path(tmp, "site")
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
             "3.12", "--implementation", "cp", *platform_args, "-d", str(wheels),
             *(f"{n}=={v}" for n, v in packages.items())],
            check=True,
        )  # fmt: skip
        for wheel in wheels.glob("*.whl"):
            zipfile.ZipFile(wheel).extractall(site)
        OUT.parent.mkdir(exist_ok=True)
        tar = subprocess.Popen(["tar", "-cf", "-", "-C", str(site), "."], stdout=subprocess.PIPE)
        with OUT.open("wb") as out:
            subprocess.run(["xz", "-T0", "-6"], stdin=tar.stdout, stdout=out, check=True)
        tar.wait()
    print(f"wrote {OUT} ({OUT.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
