"""What a generation call takes besides its prompts: one definition for every caller.

``GenerateOptions`` gathers a request's sampling (``SamplingParams``), its stop tokens and the
engine's knobs (``EngineConfig``). ``Model.generate`` / ``generate_stream``, the sample CLI, the
chat CLI and the agent all build it, from an options object, flat keywords, or both
(``GenerateOptions.of``); the keywords are exactly the fields of those dataclasses, so adding a
knob there adds it everywhere, and an unknown keyword is refused by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from k2jax.serving.sampling import SamplingParams

SEED_RANGE = 2**32


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving knobs (docs/engine.md).

    ``num_pages=None``: the batch ``Engine.run`` sizes its pool so every slot's longest request
    fits; the persistent engine sizes its pool once, from the device memory left after the
    weights where the backend reports it, else ``max_batch`` whole contexts (capped; see
    ``persistent_engine.default_num_pages``). ``prefix_cache`` shares the pages of a common
    prompt prefix between requests (``k2jax.serving.prefix_cache``).
    """

    max_batch: int = 8
    page_size: int = 16
    num_pages: int | None = None
    prefill_chunk: int = 128
    cache_dtype: str | None = None  # None: the model's dtype if float32, else bfloat16
    min_context_bucket: int = 64
    preempt: bool = True
    prefix_cache: bool = True
    # XLA options for the step programs, e.g. default_model.FAST_COMPILE for a toy model whose
    # compile time dwarfs its run time; None keeps XLA's optimizing defaults. A dict is kept as
    # sorted pairs (hashable: the step function is cached on it).
    compiler_options: tuple[tuple[str, object], ...] | None = None

    def __post_init__(self) -> None:
        for field in ("max_batch", "page_size", "prefill_chunk", "min_context_bucket"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{field} = {value!r} must be a positive integer")
        for field in ("preempt", "prefix_cache"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"EngineConfig.{field} = {getattr(self, field)!r} must be a bool")
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 2
        ):
            raise ValueError(
                f"EngineConfig.num_pages = {self.num_pages!r} must be an integer >= 2 "
                "(page 0 is the scratch page)"
            )
        if isinstance(self.compiler_options, Mapping):
            object.__setattr__(
                self, "compiler_options", tuple(sorted(self.compiler_options.items()))
            )


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_ENGINE_FIELDS = tuple(f.name for f in dataclasses.fields(EngineConfig))


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Sampling, stop tokens and engine knobs of one generation call.

    Prompt i of a call draws with seed ``(sampling.seed + i) mod 2**32``.
    ``stop_token_ids=None`` stops at the config's eos (``<|im_end|>`` for K2), ``()`` never
    stops early.
    """

    sampling: SamplingParams = SamplingParams()
    stop_token_ids: tuple[int, ...] | None = None
    engine: EngineConfig = EngineConfig()

    KEYWORDS = (*_SAMPLING_FIELDS, "stop_token_ids", *_ENGINE_FIELDS)

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"stop_token_ids must be integers, got {list(ids)!r}")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    @classmethod
    def of(cls, options: GenerateOptions | None = None, **keywords) -> GenerateOptions:
        """``options`` (default: all defaults) with the flat ``keywords`` applied: any field of
        ``SamplingParams`` or ``EngineConfig``, or ``stop_token_ids``. Raises TypeError naming
        an unknown keyword and ValueError naming a bad value."""
        options = options or cls()
        unknown = sorted(set(keywords) - set(cls.KEYWORDS))
        if unknown:
            raise TypeError(
                f"unknown generation option(s) {unknown}; the options are {list(cls.KEYWORDS)}"
            )
        sampling = {k: v for k, v in keywords.items() if k in _SAMPLING_FIELDS}
        engine = {k: v for k, v in keywords.items() if k in _ENGINE_FIELDS}
        stops = keywords.get("stop_token_ids", options.stop_token_ids)
        return cls(
            dataclasses.replace(options.sampling, **sampling),
            stops,
            dataclasses.replace(options.engine, **engine),
        )

    def sampling_for(self, prompt_index: int) -> SamplingParams:
        """The sampling of prompt ``prompt_index``: its own seed, the rest shared."""
        seed = (self.sampling.seed + prompt_index) % SEED_RANGE
        return dataclasses.replace(self.sampling, seed=seed)
