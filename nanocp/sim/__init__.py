"""Cluster-scale simulation of a decode group placed by the router's own policies.

`shapes` (model shapes) and `hardware` (devices, links) describe the world; `steptime` turns a step's per-instance
tokens, KV and routed rows into time; `calibration` fits its coefficients from bench/results into `data` (shipped
with the package, with the default trace); `cluster` puts a group and a policy together; `loop` simulates the
requests `live` follows; `metrics` reports; `sweep` finds the highest sustainable request rate.
"""
