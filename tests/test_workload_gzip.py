"""Mooncake traces load the same from plain and gzip-compressed JSON lines (bench/evaluation.py --trace takes both)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from nanocp.workload import TraceRequest, load_mooncake

ROWS = [
    {"timestamp": 0, "input_length": 120, "output_length": 7, "hash_ids": [1]},
    {"timestamp": 1500, "input_length": 9000, "output_length": 300, "hash_ids": [2, 3]},
]


def test_a_gzip_trace_loads_as_the_plain_one(tmp_path: Path) -> None:
    text = "".join(json.dumps(row) + "\n" for row in ROWS)
    plain, packed = tmp_path / "trace.jsonl", tmp_path / "trace.jsonl.gz"
    plain.write_text(text)
    packed.write_bytes(gzip.compress(text.encode()))
    expected = [TraceRequest(0.0, 120, 7), TraceRequest(1.5, 9000, 300)]
    assert load_mooncake(plain) == load_mooncake(packed) == expected
    assert load_mooncake(packed, limit=1) == expected[:1]
