"""Test-wide JAX settings, applied before JAX initializes.

- CPU only, with 8 fake devices so sharding tests can build real meshes (libtpu is installed
  for ahead-of-time TPU compilation; it must not grab the default backend here).
- Rank promotion raises, so a silently broadcast shape bug fails loudly.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
