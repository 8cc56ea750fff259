"""The Pallas paged-MLA kernel (k2jax.kernels.mla_pallas): values, reads, and TPU compilation.

Values: in Pallas' TPU interpreter with out-of-bounds reads raising (``target("tpu")``, so
``platform.interpret_params``), against attention written directly in numpy over each row's
gathered pages (float64), and against ``MLAttention.absorbed`` (the jnp form) at the same point.
Ragged rows, an idle row, a row padded at its end, page sizes 16 and 64, decode and chunked
prefill over several query blocks and key steps, float32 and bf16 caches.

Reads: ``count_copies`` evaluates the kernel's own index maps with the call's real block tables
and positions; each row's visible pages are copied once per query block, and the table entries
past a row's last position are never read (an out-of-range page id there is harmless, inside
the visible range it raises).

Compilation: the real XLA:TPU compiler (libtpu, ahead of time, no TPU needed) for v5p and v6e
with K2's shapes (64 heads, latent 512, rope 64, pages of 64, batch 8, context 8K), within the
kernel's own VMEM estimate. ``python tests/test_mla_pallas.py`` prints the smallest VMEM limit
each case compiles under and the bytes one call moves against the jnp form (the figures in
docs/mla_pallas.md).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Several test processes (and colleagues) may hold libtpu at once for AOT compilation.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from k2jax.kernels import mla_pallas  # noqa: E402
from k2jax.kernels.platform import target  # noqa: E402

SCALE = 0.3
HEADS, LATENT, ROPE, LAYERS = 4, 32, 8, 2
F32, BF16 = jnp.float32, jnp.bfloat16
K2_CONFIG = "../../shared/k2/kimi-k2-thinking.config.json"


def naive(q_lat, q_pe, pages, layer, tables, positions, scale):
    """softmax(scale * (q_lat . c_kv + q_pe . k_pe)) . c_kv over each row's gathered pages up
    to the query's position, in float64; padding queries give zeros."""
    q_lat, q_pe, pages = (np.asarray(a, np.float64) for a in (q_lat, q_pe, pages))
    b, t, n, c = q_lat.shape
    out = np.zeros((b, t, n, c))
    for row in range(b):
        keys = pages[layer, np.asarray(tables[row])].reshape(-1, pages.shape[-1])
        for tok in range(t):
            pos = positions[row, tok]
            if pos < 0:
                continue
            seen = keys[: pos + 1]
            s = scale * (q_lat[row, tok] @ seen[:, :c].T + q_pe[row, tok] @ seen[:, c:].T)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[row, tok] = (w / w.sum(-1, keepdims=True)) @ seen[:, :c]
    return out


def _rows(page_size: int, tokens: int):
    """Block tables and positions for 4 rows: long, short, idle, and one whose chunk ends in
    padding. Each live row owns distinct pages; entries past its last page are the scratch
    page 0. Returns (tables [4, W], positions [4, tokens], pool pages)."""
    lengths = [2 * page_size + 22, 17, 0, page_size + 6]
    new = [tokens, min(tokens, 5), 0, max(1, tokens // 2)]
    width = max(-(-n // page_size) for n in lengths) + 1
    num_pages = 1 + 4 * width
    ids = np.random.default_rng(page_size).permutation(np.arange(1, num_pages))
    tables = np.zeros((4, width), np.int32)
    positions = np.full((4, tokens), -1, np.int32)
    for row, (length, fresh) in enumerate(zip(lengths, new, strict=True)):
        used = -(-length // page_size)
        tables[row, :used] = ids[row * width : row * width + used]
        positions[row, :fresh] = np.arange(length - fresh, length)
    return tables, positions, num_pages


def _case(page_size, tokens, q_dtype, cache_dtype, seed=0):
    rng = np.random.default_rng(seed)
    tables, positions, num_pages = _rows(page_size, tokens)
    pool = rng.standard_normal((LAYERS, num_pages, page_size, LATENT + ROPE))
    pages = jnp.asarray(pool, cache_dtype)
    q_lat = jnp.asarray(rng.standard_normal((4, tokens, HEADS, LATENT)), q_dtype)
    q_pe = jnp.asarray(rng.standard_normal((4, tokens, HEADS, ROPE)), q_dtype)
    return q_lat, q_pe, pages, jnp.asarray(tables), positions


# Every page size with decode and prefill in float32; the bf16 cache (widened to float32
# queries, or with bf16 queries as on TPU) on a mix of the others.
CASES = [
    (16, 1, F32, F32),
    (16, 6, F32, F32),
    (64, 1, F32, F32),
    (64, 6, F32, F32),
    (16, 1, F32, BF16),
    (64, 6, F32, BF16),
    (16, 6, BF16, BF16),
    (64, 1, BF16, BF16),
]


@pytest.mark.parametrize(
    "page_size,tokens,q_dtype,cache_dtype",
    CASES,
    ids=[
        f"page{p}-{'decode' if t == 1 else 'prefill'}-q{jnp.dtype(q).name}-{jnp.dtype(c).name}"
        for p, t, q, c in CASES
    ],
)
def test_matches_naive_attention_over_gathered_pages(page_size, tokens, q_dtype, cache_dtype):
    q_lat, q_pe, pages, tables, positions = _case(page_size, tokens, q_dtype, cache_dtype)
    # Prefill: 4-token query blocks (6 tokens padded to 8: two blocks); pages of 16 two per key
    # step (several steps), pages of 64 the whole table in one step.
    tq = 4 if tokens > 1 else None
    pps = 2 if page_size == 16 else None
    with target("tpu"):
        got = mla_pallas.paged_mla_attention(
            q_lat, q_pe, pages, 1, tables, jnp.asarray(positions), scale=SCALE, tq=tq, pps=pps
        )
    got = np.asarray(got)
    want = naive(q_lat, q_pe, pages, 1, tables, positions, SCALE)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # bf16 queries: the weights are rounded to bf16 before the weighted sum (as the jnp form
    # does); float32 queries (any cache dtype, widened exactly): float32 rounding only.
    atol = 2e-2 if q_dtype == BF16 else 1e-5
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    padding = positions < 0
    assert padding.any() and (got[padding] == 0).all()


def test_fp8_cache_matches_naive_attention_over_its_values():
    q_lat, q_pe, pages, tables, positions = _case(16, 1, F32, jnp.float8_e4m3fn)
    with target("tpu"):
        got = mla_pallas.paged_mla_attention(
            q_lat, q_pe, pages, 0, tables, jnp.asarray(positions), scale=SCALE
        )
    want = naive(q_lat, q_pe, pages.astype(F32), 0, tables, positions, SCALE)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_matches_the_models_jnp_form():
    """``MLAttention.absorbed_tpu_kernel`` (this kernel) against ``MLAttention.absorbed`` (the
    jnp form over gathered pages) on the same queries, pool and tables, W_UK and W_UV applied:
    equal on every real query (the jnp form gives padding queries a uniform average, the
    kernel zeros, and the engine discards both)."""
    import dataclasses

    from k2jax import Config
    from k2jax.model import kv_cache
    from k2jax.model.attention import MLAttention

    k2 = Config.from_hf(os.path.join(os.path.dirname(__file__), K2_CONFIG))
    cfg = dataclasses.replace(
        k2,
        hidden_size=64,
        num_heads=HEADS,
        q_lora_rank=32,
        kv_lora_rank=LATENT,
        qk_nope_head_dim=16,
        qk_rope_head_dim=ROPE,
        v_head_dim=16,
    )
    n, h, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    rng = np.random.default_rng(1)
    tables, positions, num_pages = _rows(16, 6)
    pool = rng.standard_normal((LAYERS, num_pages, 16, cfg.cache_width))
    pages = jnp.asarray(pool, F32)
    q_nope = jnp.asarray(rng.standard_normal((4, 6, n, h)), F32)
    q_pe = jnp.asarray(rng.standard_normal((4, 6, n, r)), F32)
    attn = MLAttention(cfg, F32)
    x = jnp.zeros((1, 1, cfg.hidden_size), F32)
    cos = sin = jnp.zeros((1, 1, r // 2), F32)
    # Jitted: flax's init and apply run op by op otherwise, one XLA compile per op.
    init = jax.jit(attn.init)
    params = init(jax.random.key(0), x, cos, sin, jnp.zeros((1, 1), jnp.int32))
    tables, positions = jnp.asarray(tables), jnp.asarray(positions)
    kernel = jax.jit(lambda *a: attn.apply(params, *a, method=MLAttention.absorbed_tpu_kernel))
    jnp_form = jax.jit(lambda *a: attn.apply(params, *a, method=MLAttention.absorbed))
    with target("tpu"):
        got = kernel(q_nope, q_pe, pages, 1, tables, positions)
        cached = kv_cache.read_pages(pages, 1, tables)
        want = jnp_form(q_nope, q_pe, cached, positions)
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)


def test_reads_only_the_visible_pages_of_each_row():
    """Table entries past a row's last position are never read: an out-of-range page id there
    changes nothing, and the same id inside the visible range is an out-of-bounds read, which
    the interpreter raises."""
    q_lat, q_pe, pages, tables, positions = _case(16, 1, F32, F32)
    num_pages = pages.shape[1]
    past = np.asarray(tables).copy()
    past[1, 2:] = num_pages + 7  # row 1 (17 tokens) sees pages 0 and 1 only
    with target("tpu"):
        got = mla_pallas.paged_mla_attention(
            q_lat, q_pe, pages, 0, jnp.asarray(past), jnp.asarray(positions), scale=SCALE
        )
    np.testing.assert_allclose(
        np.asarray(got), naive(q_lat, q_pe, pages, 0, tables, positions, SCALE), atol=1e-5
    )
    inside = np.asarray(tables).copy()
    inside[1, 1] = num_pages + 7
    with target("tpu"), pytest.raises(Exception, match="(?i)out.of.bounds|out of range"):
        jax.block_until_ready(
            mla_pallas.paged_mla_attention(
                q_lat, q_pe, pages, 0, jnp.asarray(inside), jnp.asarray(positions), scale=SCALE
            )
        )


def _expected_page_copies(tables, positions, tq, page_size):
    """The pages a one-page-per-step kernel must fetch, in grid order: each query block's
    visible pages (the scratch page for a block of padding), a copy at each change."""
    fetched = []
    for row in range(tables.shape[0]):
        for start in range(0, positions.shape[1], tq):
            top = positions[row, start : start + tq].max()
            fetched += [tables[row, p] for p in range(top // page_size + 1)] if top >= 0 else [0]
    return 1 + sum(a != b for a, b in zip(fetched[1:], fetched[:-1], strict=True))


@pytest.mark.parametrize("tokens,tq", [(1, 1), (6, 2)], ids=["decode", "prefill"])
def test_counted_copies_are_the_visible_pages_of_each_query_block(tokens, tq):
    _, _, pages, tables, positions = _case(16, tokens, F32, BF16)
    tables_np = np.asarray(tables)
    plan = mla_pallas.tiling(4, tokens, HEADS, LATENT, ROPE, tables_np.shape[1], 16, tq=tq, pps=1)
    q_lat, q_pe, page_copies = mla_pallas.count_copies(plan, tables_np, positions, 16, layer=1)
    assert page_copies == _expected_page_copies(tables_np, positions, tq, 16)
    assert q_lat == q_pe == plan.grid[0] * plan.grid[1]
    counted = mla_pallas.counted_bytes(plan, tables_np, positions, 16, layer=1)
    assert counted["pages"] == page_copies * 16 * (LATENT + ROPE) * 2  # bf16 cache
    # Two pages per step: the same visible pages, plus at most one page per query block for
    # the second view when a block's visible pages are odd in number.
    two = mla_pallas.tiling(4, tokens, HEADS, LATENT, ROPE, tables_np.shape[1], 16, tq=tq, pps=2)
    pairs = mla_pallas.count_copies(two, tables_np, positions, 16, layer=1)[2:]
    assert page_copies <= sum(pairs) <= page_copies + two.grid[0] * two.grid[1]


# K2's attention at decode and for one 128-token prefill chunk on one chip (all 64 heads).
K2 = dict(batch=8, heads=64, latent=512, rope=64, page_size=64, context=8192, layers=61)


def _k2_args(topology: str, tokens: int):
    from sharding.topologies import topology_desc

    k = K2
    sh = jax.sharding.SingleDeviceSharding(topology_desc(topology).devices[0])
    width = k["context"] // k["page_size"]

    def sds(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    return (
        sds((k["batch"], tokens, k["heads"], k["latent"]), BF16),
        sds((k["batch"], tokens, k["heads"], k["rope"]), BF16),
        sds((k["layers"], 1 + k["batch"] * width, k["page_size"], k["latent"] + k["rope"]), BF16),
        sds((), jnp.int32),
        sds((k["batch"], width), jnp.int32),
        sds((k["batch"], tokens), jnp.int32),
    )


def _compile(topology: str, tokens: int, vmem_limit: int):
    def call(*args):
        return mla_pallas.paged_mla_attention(
            *args, scale=0.1447, interpret=False, vmem_limit_bytes=vmem_limit
        )

    return jax.jit(call).lower(*_k2_args(topology, tokens)).compile()


def _k2_plan(tokens: int):
    k = K2
    width = k["context"] // k["page_size"]
    return mla_pallas.tiling(
        k["batch"], tokens, k["heads"], k["latent"], k["rope"], width, k["page_size"]
    )


@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("tokens", [1, 128], ids=["decode", "prefill128"])
def test_compiles_for_k2_shapes_within_its_vmem_estimate(topology, tokens):
    """Compiles with the real XLA:TPU compiler under the kernel's own VMEM estimate (the
    compiler refuses a kernel whose scoped VMEM exceeds the limit it is given)."""
    estimate = _k2_plan(tokens).vmem_bytes
    hlo = _compile(topology, tokens, estimate).as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 1
    print(f"{topology} T={tokens}: compiles within {estimate / 2**20:.2f} MiB of VMEM")


def min_vmem_limit(topology: str, tokens: int, step: int = 64 << 10) -> int:
    """The smallest VMEM limit (to ``step``) the kernel compiles under: the compiler's own
    figure for what one grid step holds."""
    lo, hi = step, mla_pallas.VMEM_LIMIT_BYTES
    while hi - lo > step:
        mid = (lo + hi) // 2
        try:
            _compile(topology, tokens, mid)
            hi = mid
        except Exception as e:  # the compiler's CompileTimeScopedVmemOom
            if "vmem" not in str(e).lower():
                raise
            lo = mid
    return hi


def byte_figures(topology: str, tokens: int) -> dict[str, float]:
    """MB moved by one call at K2's shapes with every row at the end of its context: the
    kernel's counted copies plus what XLA counts around it, against the jnp form (gather,
    scores, softmax, weighted sum) compiled for the same chip, and both programs' temporaries."""
    k = K2
    width = k["context"] // k["page_size"]
    tables = np.arange(1, 1 + k["batch"] * width, dtype=np.int32).reshape(k["batch"], width)
    last = np.arange(k["context"] - tokens, k["context"], dtype=np.int32)
    counted = mla_pallas.counted_bytes(
        _k2_plan(tokens), tables, np.tile(last, (k["batch"], 1)), k["page_size"], layer=3
    )
    kernel = _compile(topology, tokens, mla_pallas.VMEM_LIMIT_BYTES)

    def jnp_form(q_lat, q_pe, pages, layer, tables, positions):
        b, p = tables.shape
        cached = pages[layer, tables].reshape(b, p * k["page_size"], -1)
        c_kv, k_pe = cached[..., : k["latent"]], cached[..., k["latent"] :]
        f32 = jnp.float32
        s = jnp.einsum("BTNC,BSC->BNTS", q_lat, c_kv, preferred_element_type=f32)
        s += jnp.einsum("BTNR,BSR->BNTS", q_pe, k_pe, preferred_element_type=f32)
        visible = jnp.arange(p * k["page_size"])[None, None] <= positions[:, :, None]
        probs = jax.nn.softmax(jnp.where(visible[:, None], s * 0.1447, -1e30), axis=-1)
        return jnp.einsum("BNTS,BSC->BTNC", probs.astype(c_kv.dtype), c_kv)

    reference = jax.jit(jnp_form).lower(*_k2_args(topology, tokens)).compile()
    mb = 1e-6
    return {
        "kernel_counted": counted["total"] * mb,
        "kernel_pages": counted["pages"] * mb,
        "kernel_xla_outside": kernel.cost_analysis()["bytes accessed"] * mb,
        "kernel_temporaries": kernel.memory_analysis().temp_size_in_bytes * mb,
        "jnp_bytes_accessed": reference.cost_analysis()["bytes accessed"] * mb,
        "jnp_temporaries": reference.memory_analysis().temp_size_in_bytes * mb,
    }


if __name__ == "__main__":
    for tokens in (1, 128):
        figures = byte_figures("v5p:2x2x1", tokens)
        print(f"v5p T={tokens} (MB): " + ", ".join(f"{n} {v:.1f}" for n, v in figures.items()))
    for topology in ("v5p:2x2x1", "v6e:2x2"):
        for tokens in (1, 128):
            need = min_vmem_limit(topology, tokens)
            est = _k2_plan(tokens).vmem_bytes
            print(
                f"{topology} T={tokens}: compiles with >= {need / 2**20:.2f} MiB "
                f"(estimate {est / 2**20:.2f} MiB)"
            )
