"""Cluster-scale simulation of a decode group placed by the router's own policies.

`shapes` (model shapes) and `hardware` (devices, links) describe the world; `steptime` turns a step's per-instance
tokens, KV and routed rows into time; `calibration` fits its coefficients from bench/results; `cluster` puts a group
and a policy together; `loop` simulates; `metrics` reports; `sweep` finds the highest sustainable request rate.
"""
