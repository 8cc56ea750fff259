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

from k2jax.load import load
from k2jax.model.config import Config, ConfigError
from k2jax.serving.loaded_model import Model

__all__ = ["Config", "ConfigError", "Model", "load"]
