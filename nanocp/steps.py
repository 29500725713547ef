"""The columns of a group step's time breakdown, shared by the worker that times its steps (nanocp.worker.timing)
and by what reads the timings back (step traces, `nanocp run`), which must not import torch to know them."""

# StepRecord.work_us() columns, the breakdown every member shares at the step exchange.
WORK = ("attention", "moe", "routing", "arrival_lag", "host")
