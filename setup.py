"""Builds k2jax's one native piece: its XLA:CPU kernels (k2jax/kernels/csrc), one shared library.

They are the fused INT4 expert matvec (int4_matvec.cc) and absorbed attention over the paged
latent cache (latent_attention.cc). Everything else is configured in pyproject.toml. The
kernels compile against the XLA FFI headers that jaxlib ships (a build requirement, pinned to
the runtime jaxlib). They are optional: where no C++ compiler is found the install still
succeeds and the CPU falls back to slower jnp formulations
(``k2jax.kernels.cpu_library.available()`` says which; see docs/int4.md).
"""

import os

import jaxlib
from setuptools import Extension, setup

INCLUDE = os.path.join(os.path.dirname(jaxlib.__file__), "include")

setup(
    ext_modules=[
        Extension(
            "k2jax.kernels._cpu_kernels",
            sources=["k2jax/kernels/csrc/int4_matvec.cc", "k2jax/kernels/csrc/latent_attention.cc"],
            include_dirs=[INCLUDE],
            language="c++",
            # Instruction sets are chosen per function and checked at run time, so no -march.
            # -ffp-contract=fast lets the vectorized loops use FMA (ISO C++ mode turns it off).
            extra_compile_args=[
                "-std=c++17",
                "-O3",
                "-ffp-contract=fast",
                "-Wno-attributes",
                "-Wno-return-type",
            ],
            optional=True,
        )
    ]
)
