"""Tokenizers behind one interface: K2's tiktoken BPE and sentencepiece (for small models).

K2 ships `tiktoken.model` (one `base64(token bytes) rank` line per token), a pre-tokenization
regex that needs class intersection (`&&`, which tiktoken's regex engine has and Python's `re`
lacks), and 256 reserved special ids right after the last rank. Their names come from
`tokenizer_config.json`'s `added_tokens_decoder`; unnamed ids are `<|reserved_token_N|>`.

`encode(text)` never produces a special id, whatever the text contains: the reference tokenizer
turns `<|im_end|>` inside user text into the control token, which lets text forge a turn
boundary. Special ids come only from `encode_special(name)` (used by the chat renderer).

Long text is cut before BPE exactly as Moonshot's `encode()` cuts it (`moonshot_slices`), so
very long runs of letters or spaces give the reference's ids, not those of one unsplit call.
"""

from __future__ import annotations

import abc
import base64
import codecs
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import sentencepiece
import tiktoken

# K2's pre-tokenization pattern, alternatives in the order of K2_REFERENCE.md's Tokenizer section.
_UPPERISH = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LOWERISH = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
K2_PRETOKENIZE_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

K2_NUM_RESERVED_SPECIAL_TOKENS = 256

# Moonshot's `encode()` (tokenization_kimi.py) cuts text before BPE: into pieces of at most
# TIKTOKEN_MAX_ENCODE_CHARS characters, and each piece wherever a run of consecutive whitespace
# or consecutive non-whitespace characters (`str.isspace`) grows past MAX_CONSECUTIVE_CHARS.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_CONSECUTIVE_CHARS = 25_000
# A run longer than the limit, matched only from its first character (the lookbehinds), so the
# scan is linear. Python's `\s` is exactly `str.isspace()`.
_LONG_RUN = re.compile(
    rf"(?<!\s)\s{{{MAX_CONSECUTIVE_CHARS + 1},}}|(?<!\S)\S{{{MAX_CONSECUTIVE_CHARS + 1},}}"
)


def moonshot_slices(text: str) -> Iterator[str]:
    """The slices Moonshot's `encode()` tokenizes separately, in order; they join to `text`.

    Pieces of `TIKTOKEN_MAX_ENCODE_CHARS` characters; inside each piece a run of whitespace or of
    non-whitespace (counted from the piece's start) is cut before its character number
    `MAX_CONSECUTIVE_CHARS + 1`, `2 * MAX_CONSECUTIVE_CHARS + 1`, ... Nothing else is cut.
    """
    for piece_start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        piece = text[piece_start : piece_start + TIKTOKEN_MAX_ENCODE_CHARS]
        slice_start = 0
        for run in _LONG_RUN.finditer(piece):
            for cut in range(run.start() + MAX_CONSECUTIVE_CHARS, run.end(), MAX_CONSECUTIVE_CHARS):
                yield piece[slice_start:cut]
                slice_start = cut
        yield piece[slice_start:]


# Names of K2's special ids, by offset from the first special id (163584 in the real vocabulary).
# Used only when a checkpoint directory has no tokenizer_config.json to read them from.
K2_SPECIAL_TOKEN_NAMES_BY_OFFSET = {
    0: "[BOS]",
    1: "[EOS]",
    2: "<|im_end|>",
    3: "<|im_user|>",
    4: "<|im_assistant|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "[EOT]",
    10: "<|im_system|>",
    11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>",
    13: "<|tool_call_begin|>",
    14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>",
    17: "<|im_middle|>",
    18: "<|media_begin|>",
    19: "<|media_content|>",
    20: "<|media_end|>",
    21: "<|media_pad|>",
    22: "<think>",
    23: "</think>",
    254: "[UNK]",
    255: "[PAD]",
}


class Tokenizer(abc.ABC):
    """Text <-> token ids. Subclasses fill the special-token tables and implement the codec."""

    special_ids: Mapping[str, int]
    """Special-token name -> id; the only way special ids enter a token sequence."""
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def __init__(self, special_ids: Mapping[str, int]):
        self.special_ids = dict(special_ids)
        self._special_names = {token_id: name for name, token_id in self.special_ids.items()}

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token strings inside it are encoded as plain text."""

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one non-special token (may be part of a UTF-8 character)."""

    def encode_special(self, name: str) -> int:
        """The id of the special token `name` (e.g. `<|im_end|>`); KeyError names what exists."""
        try:
            return self.special_ids[name]
        except KeyError:
            named = [n for n in sorted(self.special_ids) if not n.startswith("<|reserved_token_")]
            raise KeyError(
                f"no special token {name!r} in this tokenizer; it has {', '.join(named)}"
            ) from None

    @property
    def used_ids_end(self) -> int:
        """One past the largest id this tokenizer ever produces: text tokens and the named
        specials. Reserved, unnamed special ids (K2 reserves some past its 163,840-row
        embedding) are never produced, so a model needs only this many vocabulary rows."""
        named = [i for n, i in self.special_ids.items() if not n.startswith("<|reserved_token_")]
        return max(self.num_text_ids, 1 + max(named, default=-1))

    @property
    def num_text_ids(self) -> int:
        """Ids that encode text (the BPE ranks, or every sentencepiece piece)."""
        return self.vocab_size

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special (control) id rather than text."""
        return token_id in self._special_names

    def special_name(self, token_id: int) -> str:
        """The name of special id `token_id`."""
        return self._special_names[token_id]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text for `ids`; special ids become their names unless `skip_special`."""
        decoder = self.stream_decoder(skip_special=skip_special)
        pieces = [decoder.push(token_id) for token_id in ids]
        pieces.append(decoder.flush())
        return "".join(pieces)

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """A new incremental decoder for this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    def _strip_leading_space(self) -> bool:
        """Whether decoding drops one leading space (sentencepiece's dummy prefix)."""
        return False


class StreamDecoder:
    """Decodes ids one at a time, never emitting part of a UTF-8 character.

    Bytes of an unfinished character wait for the next token; bytes that can never form a
    character come out as U+FFFD, as in `bytes.decode(errors="replace")`.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer._strip_leading_space()

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text completed by it (possibly empty)."""
        if self._tokenizer.is_special(token_id):
            pending = self._utf8.decode(b"", final=True)
            self._utf8.reset()
            name = "" if self._skip_special else self._tokenizer.special_name(token_id)
            return pending + name
        text = self._utf8.decode(self._tokenizer.token_bytes(token_id))
        if self._at_start and text:
            self._at_start = False
            if text.startswith(" "):
                text = text[1:]
        return text

    def flush(self) -> str:
        """Text of bytes still pending at the end of the stream (replacement chars if partial)."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class TiktokenTokenizer(Tokenizer):
    """K2's byte-level BPE through tiktoken, with K2's pattern and reserved special ids."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names_by_id: Mapping[int, str] | None = None,
        *,
        pattern: str = K2_PRETOKENIZE_PATTERN,
        num_reserved_special_tokens: int = K2_NUM_RESERVED_SPECIAL_TOKENS,
        bos_name: str = "[BOS]",
        eos_name: str = "[EOS]",
        name: str = "k2",
    ):
        num_base = len(mergeable_ranks)
        if max(mergeable_ranks.values()) != num_base - 1:
            raise ValueError(
                f"tiktoken ranks must be 0..{num_base - 1} without gaps, "
                f"got max rank {max(mergeable_ranks.values())}"
            )
        names = dict(special_names_by_id or {})
        # The reference reserves ids after the last rank and names them by id, as here.
        special_ids = {}
        for token_id in range(num_base, num_base + num_reserved_special_tokens):
            special_ids[names.get(token_id, f"<|reserved_token_{token_id}|>")] = token_id
        super().__init__(special_ids)
        self._encoding = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special_ids
        )
        self._bytes_by_id = {rank: token for token, rank in mergeable_ranks.items()}
        self.vocab_size = num_base + num_reserved_special_tokens
        self._num_base = num_base
        self.bos_id = special_ids.get(bos_name)
        self.eos_id = special_ids.get(eos_name)

    @property
    def num_text_ids(self) -> int:
        return self._num_base

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token strings inside it are encoded as plain text.

        Cut into `moonshot_slices` first, as the reference's `encode()` does; each slice is then
        encoded with `encode_ordinary`, never recognising special-token strings.
        """
        if len(text) <= MAX_CONSECUTIVE_CHARS:  # nothing to cut
            return self._encoding.encode_ordinary(text)
        ids: list[int] = []
        for piece in moonshot_slices(text):
            ids += self._encoding.encode_ordinary(piece)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one non-special token."""
        try:
            return self._bytes_by_id[token_id]
        except KeyError:
            raise ValueError(f"token id {token_id} is outside the vocabulary") from None


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` (small test models) behind the same interface.

    Control pieces (`<s>`, `</s>`, `--control_symbols`) are special ids; sentencepiece never
    produces them from text. User-defined pieces are matched in text by sentencepiece itself, so
    `encode` replaces any special-looking one it produced (`<|tool|>`: anything but letters and
    digits) by the piece's characters, keeping special strings text. A user-defined piece of
    letters and digits only is an ordinary word the model's trainer chose to keep whole (the
    default model's country and capital names, k2jax/train/data.py) and stays one token.
    """

    def __init__(self, model_file: str | os.PathLike):
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        sp = self._sp
        special_ids = {
            sp.id_to_piece(token_id): token_id
            for token_id in range(sp.get_piece_size())
            if sp.is_control(token_id) or sp.is_unknown(token_id)
        }
        super().__init__(special_ids)
        self._user_defined_ids = frozenset(
            i
            for i in _sentencepiece_user_defined_ids(model_file)
            if not sp.id_to_piece(i).replace("\u2581", "").isalnum()
        )
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self._dummy_prefix = sp.id_to_piece(sp.encode("a")[0]).startswith("\u2581")

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special-token strings inside it are encoded as plain text."""
        ids = self._sp.encode(text)
        if not self._user_defined_ids.intersection(ids):
            return ids
        literal_ids: list[int] = []
        for token_id in ids:
            if token_id in self._user_defined_ids:
                literal_ids.extend(self._literal_ids(self._sp.id_to_piece(token_id)))
            else:
                literal_ids.append(token_id)
        return literal_ids

    def _literal_ids(self, piece_text: str) -> list[int]:
        ids = []
        for char in piece_text:
            char_id = self._sp.piece_to_id(char)
            if char_id != self._sp.unk_id() and char_id not in self._user_defined_ids:
                ids.append(char_id)
                continue
            byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in char.encode()]
            if all(self._sp.is_byte(i) for i in byte_ids):
                ids.extend(byte_ids)
            else:
                ids.append(self._sp.unk_id())
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one non-special token (`▁` is a space, `<0xAB>` one byte)."""
        if self._sp.is_byte(token_id):
            return bytes([int(self._sp.id_to_piece(token_id)[3:5], 16)])
        return self._sp.id_to_piece(token_id).replace("\u2581", " ").encode()

    def _strip_leading_space(self) -> bool:
        return self._dummy_prefix


def _sentencepiece_user_defined_ids(model_file: str | os.PathLike) -> frozenset[int]:
    # The Python API has no is_user_defined(); the piece types are in the model proto.
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as file:
        model.ParseFromString(file.read())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.USER_DEFINED
    return frozenset(i for i, piece in enumerate(model.pieces) if piece.type == user_defined)


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parses a `tiktoken.model` file: one `base64(token bytes) rank` line per token."""
    ranks = {}
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as error:
                raise ValueError(
                    f"{path}:{line_number}: expected 'base64 rank', got {line[:60]!r}"
                ) from error
    return ranks


def _token_content(entry: object) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def _load_tiktoken_dir(model_file: Path) -> TiktokenTokenizer:
    ranks = read_tiktoken_ranks(model_file)
    config_file = model_file.parent / "tokenizer_config.json"
    bos_name, eos_name = "[BOS]", "[EOS]"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        names = {
            int(token_id): entry["content"]
            for token_id, entry in config.get("added_tokens_decoder", {}).items()
        }
        bos_name = _token_content(config.get("bos_token")) or bos_name
        eos_name = _token_content(config.get("eos_token")) or eos_name
    else:
        names = {
            len(ranks) + offset: name for offset, name in K2_SPECIAL_TOKEN_NAMES_BY_OFFSET.items()
        }
    return TiktokenTokenizer(ranks, names, bos_name=bos_name, eos_name=eos_name)


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as file:
        first_line = file.readline()
    parts = first_line.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def load_tokenizer(dir_or_file: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a checkpoint directory or a model file.

    A directory is searched for `tiktoken.model` (K2; special names from the
    `tokenizer_config.json` next to it) and then `tokenizer.model` (sentencepiece). A file is
    recognised by its contents.
    """
    path = Path(dir_or_file)
    if path.is_dir():
        for candidate in ("tiktoken.model", "tokenizer.model"):
            if (path / candidate).exists():
                path = path / candidate
                break
        else:
            raise FileNotFoundError(f"{path} has neither tiktoken.model nor tokenizer.model")
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    if _looks_like_tiktoken(path):
        return _load_tiktoken_dir(path)
    return SentencePieceTokenizer(path)
