"""The placement policies' names, importable without the policies (the CLI parses them before loading anything)."""

POLICY_NAMES = ("static", "balanced", "dcp", "uniform")
