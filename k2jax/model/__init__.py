"""What the model computes: config, layers, rope, MLA attention, MoE and its expert matmul, the
INT4 weight classes, the paged cache's layout, and the transformer.

Pure functions of params and inputs. The transformer's entry points are re-exported here, so
``from k2jax import model`` gives ``model.forward``, ``model.init_params`` and the rest. This
package imports ``k2jax.kernels`` below it and never ``sharding``, ``convert`` or serving.
"""

from k2jax.model.transformer import (
    EXPERT_LAYOUTS,
    STACKS,
    abstract_params,
    embed,
    forward,
    hint,
    init_params,
    int4_projection,
    lm_logits,
    param_axes,
    run_layers,
    to_expert_layout,
    unstack_layers,
)

__all__ = [
    "EXPERT_LAYOUTS",
    "STACKS",
    "abstract_params",
    "embed",
    "forward",
    "hint",
    "init_params",
    "int4_projection",
    "lm_logits",
    "param_axes",
    "run_layers",
    "to_expert_layout",
    "unstack_layers",
]
