"""Harnesses for tests and benchmarks, kept apart from the product: offline decode groups run in processes of this
machine (`offline_group`), the CPU group the simulator is calibrated against (`cpu_group`), and the straggler hook
that plants a delay in a step section (`delays`). Nothing under nanocp/ outside this package imports it.
"""
