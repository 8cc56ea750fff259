"""Builds a small tokenizer directory in K2's real on-disk format, for tests.

The base vocabulary is the 256 single bytes plus merges learned by a tiny BPE trainer on a few
lines of English, Chinese and code. The file is then padded with unreachable filler tokens (each
starts with byte 0xFF, which UTF-8 text never contains) up to K2's 163,584 ranks, so the 256
reserved special ids sit at K2's own ids 163584..163839 and the loader's rule "specials follow
the last rank" is exercised exactly as with the real checkpoint. `tokenizer_config.json` names
them as K2's does.
"""

from __future__ import annotations

import atexit
import base64
import collections
import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

from k2jax.chat.tokenizer import K2_SPECIAL_TOKEN_NAMES_BY_OFFSET, Tokenizer, load_tokenizer

K2_NUM_BASE_TOKENS = 163_584
K2_FIRST_SPECIAL_ID = K2_NUM_BASE_TOKENS

TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. What is the weather in Paris today?
You are Kimi, an AI assistant created by Moonshot AI. Let me think about this step by step.
def add(a, b):\n    return a + b\n\nprint(add(2, 3))
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
user assistant system tool tool_declare function functions parameters properties type string
我们今天去北京天气很好。你好世界，我爱编程。这是一个测试。
The answer is 42. Return of the result. I'll check the weather and we're done, isn't it?
"""

NUM_MERGES = 300

# Training only decides which merges exist, so a rough split is enough; encoding uses K2's
# real pattern through tiktoken.
_TRAINING_SPLIT = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+")


def train_byte_bpe(text: str, num_merges: int) -> list[bytes]:
    """Learns `num_merges` byte-pair merges on `text`; returns the merged tokens in rank order."""
    word_counts = collections.Counter(
        tuple(bytes([b]) for b in word.encode()) for word in _TRAINING_SPLIT.findall(text)
    )
    merged_tokens: list[bytes] = []
    for _ in range(num_merges):
        pair_counts: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, count in word_counts.items():
            for pair in zip(word, word[1:], strict=False):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merged_tokens.append(best[0] + best[1])
        new_counts: collections.Counter[tuple[bytes, ...]] = collections.Counter()
        for word, count in word_counts.items():
            parts, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    parts.append(best[0] + best[1])
                    i += 2
                else:
                    parts.append(word[i])
                    i += 1
            new_counts[tuple(parts)] += count
        word_counts = new_counts
    return merged_tokens


def write_k2_tokenizer_dir(directory: Path, *, pad_to_k2_ids: bool = True) -> Path:
    """Writes `tiktoken.model` and `tokenizer_config.json` in K2's format into `directory`."""
    tokens = [bytes([b]) for b in range(256)]
    for token in train_byte_bpe(TRAINING_TEXT, NUM_MERGES):
        if token not in tokens:
            tokens.append(token)
    if pad_to_k2_ids:
        filler_count = K2_NUM_BASE_TOKENS - len(tokens)
        tokens.extend(b"\xff" + index.to_bytes(3, "big") for index in range(filler_count))
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(tokens)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    first_special = len(tokens)
    added_tokens = {
        str(first_special + offset): {"content": name, "special": True}
        for offset, name in K2_SPECIAL_TOKEN_NAMES_BY_OFFSET.items()
    }
    config = {
        "added_tokens_decoder": added_tokens,
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "tokenizer_class": "TikTokenTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


@functools.cache
def k2_tokenizer_dir() -> Path:
    """A K2-format tokenizer directory (specials at K2's ids), built once per test process and
    removed when the process exits."""
    directory = Path(tempfile.mkdtemp(prefix="k2_tokenizer_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return write_k2_tokenizer_dir(directory)


@functools.cache
def k2_test_tokenizer() -> Tokenizer:
    """The tokenizer loaded from `k2_tokenizer_dir()`, shared by the chat and agent tests."""
    return load_tokenizer(k2_tokenizer_dir())


_SPECIAL_NAME = re.compile(r"(<\|[a-z_0-9]+\|>|</?think>|\[EOS\])")


def generated_ids(text: str) -> list[int]:
    """Token ids of a generated turn written with special-token names, as the model emits them."""
    tokenizer = k2_test_tokenizer()
    ids = []
    for piece in _SPECIAL_NAME.split(text):
        if piece in tokenizer.special_ids:
            ids.append(tokenizer.encode_special(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    return ids
