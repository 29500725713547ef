"""The worker: one decode instance (engine, model, KV cache) behind the internal gRPC API, stepping with its group.

One token's path: `server` (Submit) -> `loop` (the engine thread) -> `engine` (the step loop) -> `scheduler` (which
chunks) -> `exchange` (the group's agreement) -> `planner` (inputs and routes) -> `model_runner` (forward, graphs,
sampling) -> `model` -> `attention` (local shards, routes, merge) -> `comm` (the route primitive).
"""
