"""The placement policies' names and dcp's defaults, importable without the policies (the CLI parses them before
loading anything); the router, `nanocp run` and the simulator all take dcp's defaults from here."""

POLICY_NAMES = ("static", "balanced", "dcp", "uniform")
DEFAULT_SHARD_TOKENS = 4096  # dcp's shards hold this much on average at least; the cost model decides whether to split
DEFAULT_MAX_DEGREE = 8
SHARD_TOKENS_HELP = (
    "dcp: KV tokens a shard should hold at least (a request splits at most tokens / this ways); it splits only when "
    f"the cost model predicts a faster group step (default {DEFAULT_SHARD_TOKENS})"
)
