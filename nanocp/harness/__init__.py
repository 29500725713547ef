"""Harnesses for tests and benchmarks, kept apart from the product: offline decode groups run in processes of this
machine (`offline_group`), the CPU group the simulator is calibrated against (`cpu_group`), the straggler hook
that plants a delay in a step section (`delays`), and requests the dcp policy splits over a group (`cp_streams`).
Nothing under nanocp/ outside this package imports it.
"""
