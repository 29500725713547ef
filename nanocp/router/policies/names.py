"""The placement policies' names and dcp's defaults, importable without the policies (the CLI parses them before
loading anything); the router, `nanocp run` and the simulator all take dcp's defaults from here."""

POLICY_NAMES = ("static", "balanced", "dcp", "uniform")
DEFAULT_SHARD_TOKENS = 4096  # dcp cuts no shard smaller; the cost model decides whether to split at all
DEFAULT_MAX_DEGREE = 8
SHARD_TOKENS_HELP = (
    "dcp: the smallest shard it cuts a request into; it splits only when the cost model predicts a faster group "
    f"step (default {DEFAULT_SHARD_TOKENS})"
)
