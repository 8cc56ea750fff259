"""k2jax's XLA:CPU kernels (k2jax/kernels/csrc), loaded and registered with XLA once.

One shared library, built by ``pip install`` (setup.py), holds two FFI targets: the fused INT4
expert matvec (``k2jax.kernels.int4_cpu``) and absorbed attention over the paged latent cache
(``k2jax.kernels.attention_cpu``). It ships with no checkpoint and runs no code from one.
Where it was not built (no C++ compiler at install time) ``available()`` is False, a warning
says so once, and the model uses its jnp formulations instead.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import warnings

import jax

MODULE = "k2jax.kernels._cpu_kernels"
# FFI target name -> the handler symbol the library exports.
TARGETS = {
    "k2jax_int4_matvec": "K2jaxInt4Matvec",
    "k2jax_latent_attention": "K2jaxLatentAttention",
}
# Instruction sets the kernels can be told to use (tests run each); "auto" is the best present.
ISAS = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library with its targets registered; None where it was not built."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        warnings.warn(
            "k2jax's CPU kernels were not built (no C++ compiler when k2jax was installed?); "
            "the CPU uses the slower jnp formulations. Reinstall with g++ present: "
            'pip install -e ".[test]"',
            stacklevel=3,
        )
        return None
    lib = ctypes.cdll.LoadLibrary(spec.origin)
    lib.K2jaxBestIsa.restype = ctypes.c_int32
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def available() -> bool:
    """Whether the kernels were built and registered."""
    return library() is not None


def best_isa() -> str:
    """The instruction set ``isa="auto"`` runs on this CPU."""
    require()
    code = library().K2jaxBestIsa()
    return next(name for name, value in ISAS.items() if value == code)


def isa_code(isa: str) -> int:
    """The kernels' ``isa`` attribute for ``isa``; ValueError for an unknown name."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {tuple(ISAS)}, got {isa!r}")
    return ISAS[isa]


def require() -> None:
    """RuntimeError unless the kernels are built."""
    if not available():
        raise RuntimeError("k2jax's CPU kernels are not built")
