"""Files the simulator ships with, as package data, so an installed nanocp finds them from any directory: the step-time
calibrations (`nanocp sim calibrate` writes them here, the one copy) and the head of the Mooncake trace, which
`nanocp sim run` and `sweep` replay unless given --trace or --mix."""

from pathlib import Path

DATA = Path(__file__).parent
# The first 300 requests of the public Mooncake synthetic trace (Apache-2.0), hash ids dropped.
MOONCAKE_HEAD = DATA / "mooncake-head.jsonl"


def calibration_path(kind: str) -> Path:
    """The committed step-time calibration of "gpu" (H100 shapes) or "cpu" (the tiny model's CPU group)."""
    return DATA / f"sim_calibration_{kind}.json"
