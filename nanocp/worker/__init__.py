"""The worker: one decode instance (engine, model, KV cache) behind the internal gRPC API, stepping with its group.

One token's path: `server` (Submit) -> `loop` (the engine thread) -> `engine` (the step loop) -> `scheduler` (which
chunks) -> `group` (the step exchange: the group's agreement) -> `planner` (inputs, routes, sampling rows) ->
`model_runner` (forward, graphs, sampling) -> `model` -> `attention` (local shards, routes, merge) -> `routing` (the
routing layer); `kv_cache` holds the pages and shards, `request` what a request is and what is refused.
"""
