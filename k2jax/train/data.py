"""Training data: a sentencepiece tokenizer trained on the generated text, and token batches.

The tokenizer is trained here on the conversations' text (byte fallback on, so any text
encodes; digits split one per token; the tools' country and capital names one piece each; text
kept exactly: identity normalization, no dummy prefix, whitespace preserved). K2's chat
special tokens are control symbols, so
``k2jax.chat.render`` maps them to ids by name and ``encode`` never produces them from text:
``render``, ``parse`` and the agent work unchanged through
``k2jax.chat.tokenizer.SentencePieceTokenizer``.

A conversation becomes one row of token ids with a loss mask that is 1 exactly on what the
model writes in the last exchange: each assistant turn's ``<think>`` ... ``<|im_end|>``. The
prompt parts (tool declaration, system, user, tool results, the ``<|im_assistant|>assistant
<|im_middle|>`` header) and any earlier exchange are context only. The row up to the final
answer is exactly ``render(messages[:-1], tools)``, the prompt the agent builds for that turn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from k2jax.chat.render import STRUCTURAL_TOKENS, Special, render, render_segments
from k2jax.chat.tokenizer import SentencePieceTokenizer, Tokenizer
from k2jax.chat.tools import CAPITALS

PAD_PIECE = "<pad>"

# Every word of the countries and capitals get_capital knows is one piece of its own, so a name
# is the same token after a space ("of Egypt") and after a quote ('{"country": "Egypt"}', the
# tool result's line): copying it is the identity. Trained freely, BPE merged the space into
# the first piece ("▁E" + "gypt" in prose, "E" + "gypt" in JSON), so the model had to learn a
# translation per name, and the 2,200-step model copied none (0% on capital questions).
NAME_SYMBOLS = sorted({word for name in (*CAPITALS, *CAPITALS.values()) for word in name.split()})


def training_text(convs: Sequence[dict], tools) -> Iterator[str]:
    """The plain-text runs of the rendered conversations (what the tokenizer must encode)."""
    for conv in convs:
        for segment in render_segments(conv["messages"], tools, add_generation_prompt=True):
            if not isinstance(segment, Special) and segment:
                yield segment
        for message in conv["messages"]:
            if message.get("reasoning_content"):
                yield message["reasoning_content"]


def train_tokenizer(texts: Iterator[str], model_prefix: str, vocab_size: int) -> str:
    """Trains a BPE sentencepiece model on ``texts``; returns the ``.model`` path."""
    import sentencepiece

    os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentence_length=1 << 16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        pad_piece=PAD_PIECE,
        control_symbols=list(STRUCTURAL_TOKENS),
        user_defined_symbols=NAME_SYMBOLS,
        num_threads=1,
        minloglevel=2,
    )
    return f"{model_prefix}.model"


def load_tokenizer(path: str | os.PathLike) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(path)


def encode_conversation(conv: dict, tools, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation; see the module docstring."""
    messages = conv["messages"]
    start = conv.get("history", 0)
    final = messages[-1]
    if final.get("role") != "assistant" or final.get("tool_calls"):
        raise ValueError("a training conversation ends with an assistant answer")
    # Token boundaries of each message of the last exchange (the prefixes render identically:
    # the last plain answer before them, if any, is in the history).
    bounds = [
        len(render(messages[:k], tools, add_generation_prompt=False, tokenizer=tokenizer))
        for k in range(start, len(messages))
    ]
    ids = render(messages[:-1], tools, add_generation_prompt=True, tokenizer=tokenizer)
    mask = [0] * len(ids)
    header = len(ids) - bounds[-1]  # <|im_assistant|>assistant<|im_middle|>
    for k in range(start, len(messages) - 1):
        if messages[k]["role"] == "assistant":
            lo, hi = bounds[k - start] + header, bounds[k - start + 1]
            mask[lo:hi] = [1] * (hi - lo)
    answer = [tokenizer.encode_special("<think>")]
    answer += tokenizer.encode(final.get("reasoning_content") or "")
    answer += [tokenizer.encode_special("</think>")]
    answer += tokenizer.encode(final.get("content") or "")
    answer += [tokenizer.encode_special("<|im_end|>")]
    return ids + answer, mask + [1] * len(answer)


def pack_rows(
    encoded: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows [N, seq_len + 1] of ids and loss masks, padded (mask 0); longer ones are dropped.

    A row of seq_len + 1 gives seq_len inputs and their next-token targets.
    """
    keep = [(i, m) for i, m in encoded if len(i) <= seq_len + 1]
    tokens = np.full((len(keep), seq_len + 1), pad_id, np.int32)
    mask = np.zeros((len(keep), seq_len + 1), np.float32)
    for row, (ids, m) in enumerate(keep):
        tokens[row, : len(ids)] = ids
        mask[row, : len(m)] = m
    return tokens, mask


def batch_at(
    tokens: np.ndarray, mask: np.ndarray, step: int, batch_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Batch ``step`` of an epoch-wise shuffle: a pure function of (seed, step), so a resumed
    run reads exactly the batches an uninterrupted one would."""
    n = len(tokens)
    per_epoch = n // batch_size
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    rows = order[index * batch_size : (index + 1) * batch_size]
    return tokens[rows], mask[rows]
