"""Placing K2 on a TPU slice: the mesh, the rules table, multi-host start-up, and the plan.

- ``sharding.mesh``: the (data, expert, tensor) mesh.
- ``sharding.rules``: logical axis names -> mesh axes, one table per strategy.
- ``sharding.plan``: ``python -m sharding.plan``, the decode step compiled by XLA:TPU ahead of
  time for a named slice, its memory, bytes, FLOPs, collectives and roofline; without
  ``--mesh`` it picks the layout (``sharding.search``).
- ``sharding.collectives``: the collectives of a compiled program, from its HLO.
- ``sharding.topologies``: chips (HBM, bandwidths, peak FLOP/s, ICI, collective latency) and
  slice names.
- ``sharding.distributed``: multi-host initialization.

Where the collectives are at decode, for one step of B sequences (T = 1 new token each) on a
mesh data d x expert e x tensor t, N = e x t, D = 7168 (K2), bf16 activations. Scaling-book
notation: ``X[A_N]`` is A split over the N chips of (expert, tensor); ``{U_N}`` partial sums
over them awaiting a reduction. Sizes are what one chip sends, ring algorithm, for K2:

- embedding, once: ``take(embed[V_N, D], tok[B_d]) -> x[B_d, D] {U_N}``: AllReduce_N of
  B/d x D values (14 KB a sequence; 2 x 14 KB x (N-1)/N sent).
- attention, per layer: q_a and kv_a are split over their inputs (``down_in``):
  ``x[B_d, D_N] . [w_q_down | w_kv_down][D_N, 2112] -> {U_N}``, AllReduce_N of B/d x 2,112
  float32 values (8.4 KB a sequence), after which the queries' low-rank state and the cached
  latent are on every chip (every chip writes the same latent pool); ``q[B_d, heads_N, K]``
  and the attention over the pool are local;
  ``out[B_d, heads_N, U] . w_o[heads_N, U, D] -> y[B_d, D] {U_N}``: AllReduce_N of B/d x D.
- dense MLP (layer 0) and shared expert: ``h[B_d, F_N] . w_down[F_N, D] -> {U_N}``. In MoE
  layers XLA merges this all-reduce with the routed experts' (same devices, same shape).
- routed experts (``k2jax.model.moe``, a ``shard_map``): the router runs replicated; each chip
  applies its E/N experts (under ``decode`` / ``context_parallel``: its E/e experts' 1/t slices
  of the intermediate axis, ``expert_mlp``) to the tokens that chose them;
  ``y[B_d, D] {U_N}``: AllReduce_N, the layer's third and last collective. Prefill (tokens
  over (data, expert)): AllGather_e of the tokens in, ReduceScatter_e + AllReduce_t out.
- lm_head: ``logits[B_d, V_N]``, local; gathered only where the caller asks for whole logits.

So a decode step is 3 x 61 + 1 = 184 all-reduces (K2, N > 1), which the plan reads back from
the compiled program (``ici_bytes``, ``ici_ops``). At batch 1 that is ~4.5 MB sent per chip
per step: latency-bound (184 x the stated 10 us = 1.8 ms), not bandwidth-bound; the q_a/kv_a
all-reduce a layer (0.6 ms) buys 1.84 GB less read (0.67 ms of v5p HBM). Under ``decode`` the
latent pool is replicated on every chip.

``dp_attention`` (batch and page pool over (data, expert) = n shards, heads over tensor): each
chip writes and attends over only its batch shard's pages (no communication for the cache);
``out[B_n, heads_t, U] . w_o[heads_t, U, D] -> {U_t}``: AllReduce_t of B/n x D per layer; the
MoE gathers its tokens over expert, AllGather_e of B/n x D in, and ReduceScatter_e +
AllReduce_t of B/d x D out; the shared expert and dense MLP (over tensor) reduce over tensor.
Measured on v5p-64 (1,16,2, batch 512): 123 all-reduces, 180 all-gathers and 60
reduce-scatters a step, 0.88 GB sent per chip.

``context_parallel`` (every sequence's pages striped over all N chips, weights as ``decode``,
the batch whole): per layer, the queries ``[B, heads, 576]`` are all-gathered over the head
axes (one AllGather_N, 74 KB a sequence), each chip attends over its own pages, and the partial
results merge by log-sum-exp: AllMax_N of ``[B, heads]`` and AllReduce_N of
``[B, heads, kv_lora + 1]`` (131 KB a sequence), beside ``decode``'s three all-reduces a
layer. Measured on v5p-64 (1,4,8, batch 1, 262,144 positions): 306 all-reduces (5 a layer +
1) and 61 all-gathers a step: latency-bound (3.7 ms at the stated 10 us each).
"""
