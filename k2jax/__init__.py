"""k2jax: Kimi K2 Thinking in JAX and Flax, with native INT4 experts and a paged MLA cache.

Dimension letters, used in every einsum and in tensor names (``x_BTD``):

====  =========================================  ==========
B     batch (sequences)
T     new tokens in this call
S     cache positions (keys)
P     pages
D     hidden                                     7168
N     attention heads                            64
Q     q low rank                                 1536
C     kv low rank (latent)                       512
H     nope head dim (query/key)                  128
R     rope head dim                              64
U     value head dim                             128
W     cached values per token, C + R             576
F     dense MLP                                  18432
M     expert MLP                                 2048
E     routed experts                             384
K     experts chosen per token                   8
L     layers                                     61
V     vocabulary                                 163840
G     quantization groups (of 32 inputs)
====  =========================================  ==========
"""

# Before anything starts JAX: on a host with no TPU or GPU, run on the CPU directly instead of
# letting libtpu (installed for ahead-of-time TPU compilation) probe for chips and print errors.
from k2jax.kernels.platform import default_to_cpu_without_accelerators

default_to_cpu_without_accelerators()

from k2jax.default_model import load_default  # noqa: E402
from k2jax.load import load  # noqa: E402
from k2jax.model.config import Config, ConfigError  # noqa: E402
from k2jax.serving.loaded_model import Model  # noqa: E402

__all__ = ["Config", "ConfigError", "Model", "load", "load_default"]
