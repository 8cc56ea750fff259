"""Builds k2jax's one native piece: the XLA:CPU fused INT4 matvec (k2jax/csrc/int4_matvec.cc).

Everything else is configured in pyproject.toml. The kernel compiles against the XLA FFI
headers that jaxlib ships (a build requirement, pinned to the runtime jaxlib). It is optional:
where no C++ compiler is found the install still succeeds and the CPU falls back to the slower
jnp formulation (``k2jax.int4_cpu.available()`` says which; see docs/int4.md).
"""

import os

import jaxlib
from setuptools import Extension, setup

INCLUDE = os.path.join(os.path.dirname(jaxlib.__file__), "include")

setup(
    ext_modules=[
        Extension(
            "k2jax._int4_matvec",
            sources=["k2jax/csrc/int4_matvec.cc"],
            include_dirs=[INCLUDE],
            language="c++",
            # Instruction sets are chosen per function and checked at run time, so no -march.
            extra_compile_args=["-std=c++17", "-O3", "-Wno-attributes", "-Wno-return-type"],
            optional=True,
        )
    ]
)
