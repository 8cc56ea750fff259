"""What runs the model for requests: the ``Model`` object ``k2jax.load`` returns, the
continuous-batching engine, the page allocator and the sampler. Sits above ``k2jax.model``."""
