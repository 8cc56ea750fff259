"""Hand-written kernels and the choice of target: the bottom of k2jax's import graph.

- ``int4_pallas``: the Pallas TPU kernel for grouped INT4 expert matmuls.
- ``int4_cpu``, ``attention_cpu``: the XLA:CPU FFI kernels (C++ in ``csrc/``), loaded by
  ``cpu_library``.
- ``int4_format``: K2's INT4 packing, shared with the model's weight classes.
- ``platform``: which platform a program is traced for, and the CPU default for CLIs.

Kernels take arrays and small format descriptions; they import nothing from ``k2jax.model``.
"""
