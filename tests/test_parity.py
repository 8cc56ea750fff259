"""Whole-model parity: k2jax's prefill logits against transformers' DeepseekV3 (float32).

Each config is a random tiny K2-structured model whose routed experts are packed by
compressed-tensors and written in K2 Thinking's on-disk format; k2jax loads that directory.
The bound is absolute on logits of magnitude ~3-5 (float32 against float32: observed ~1e-5).
"""

import numpy as np
import pytest
import reference
import torch

import k2jax

BOUND = 1e-3


@pytest.fixture(scope="module", params=sorted(reference.PARITY_CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    ref = reference.build(seed=len(name), **reference.PARITY_CONFIGS[name])
    path = reference.write_checkpoint(ref, tmp_path_factory.mktemp(name))
    return name, ref, k2jax.load(path, dtype="float32")


def test_prefill_logits_match_reference(pair):
    name, ref, model = pair
    tokens = np.random.RandomState(1).randint(0, ref.raw["vocab_size"], (2, 24))
    ours = model.logits(tokens)
    theirs = ref.logits(tokens).numpy()
    assert ours.shape == theirs.shape == (2, 24, ref.raw["vocab_size"])
    diff = np.abs(ours - theirs).max()
    print(f"{name}: max |logit diff| = {diff:.3g} (max |logit| {np.abs(theirs).max():.2f})")
    assert diff <= BOUND
    # Same next-token choice everywhere: the comparison is not vacuous.
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def _router_inputs(ref):
    """The hidden states each MoE router sees on a random prompt, captured from the reference."""
    captured = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, args, out: captured.append((m, args[0])))
        for layer in ref.torch_model.model.layers
        if hasattr(layer.mlp, "gate")
    ]
    tokens = np.random.RandomState(2).randint(0, ref.raw["vocab_size"], (2, 24))
    ref.logits(tokens)
    for h in hooks:
        h.remove()
    return captured


def _choices(router, x, **changes):
    saved = {k: getattr(router, k) for k in changes}
    bias = router.e_score_correction_bias.clone()
    try:
        for k, v in changes.items():
            if k == "e_score_correction_bias":
                router.e_score_correction_bias.copy_(v)
            else:
                setattr(router, k, v)
        with torch.no_grad():
            _, _, idx = router(x)
        return idx.sort(-1).values
    finally:
        router.e_score_correction_bias.copy_(bias)
        for k, v in saved.items():
            if k != "e_score_correction_bias":
                setattr(router, k, v)


def test_bias_and_group_limit_change_routing(pair):
    """The test data is sensitive: dropping the bias (or the group limit) changes choices."""
    name, ref, _ = pair
    for router, x in _router_inputs(ref):
        base = _choices(router, x)
        unbiased = _choices(
            router, x, e_score_correction_bias=torch.zeros_like(router.e_score_correction_bias)
        )
        assert (base != unbiased).any(dim=-1).sum() > 0, f"{name}: bias never changes routing"
        if router.num_group > 1 and router.topk_group < router.num_group:
            ungrouped = _choices(router, x, topk_group=router.num_group)
            assert (base != ungrouped).any(dim=-1).sum() > 0, f"{name}: group limit is inert"
