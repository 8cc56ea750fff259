"""A chat tokenizer for the built-in default model: UTF-8 bytes plus K2's structural specials.

The default model (k2jax.default_model) has no tokenizer: its 264 ids are the 256 byte values
followed by [BOS], [EOS], [PAD] and five unused ids. K2's chat format needs twelve structural
special tokens, and they must be ids that text never produces (`Tokenizer.encode` contract).
Valid UTF-8 never contains the bytes 0xC0, 0xC1 or 0xF5..0xFF, so the seven of those from 0xF5
carry the think and tool-call tokens, and the five free ids after [PAD] carry the turn markers.
Text is encoded as its UTF-8 bytes; no text, whatever it contains, can encode to a special id.

This lets the server (and its tests) run the whole chat path against the random default model
with the real renderer and parser. It is a stand-in, exact with nothing: a real checkpoint
brings its own tokenizer.
"""

from __future__ import annotations

from k2jax import default_model
from k2jax.chat.tokenizer import Tokenizer

BYTE_CHAT_SPECIAL_IDS = {
    "[BOS]": default_model.BOS_ID,
    "[EOS]": default_model.EOS_ID,
    "[PAD]": default_model.PAD_ID,
    "<|im_end|>": 259,
    "<|im_user|>": 260,
    "<|im_assistant|>": 261,
    "<|im_system|>": 262,
    "<|im_middle|>": 263,
    # Bytes no UTF-8 text contains.
    "<think>": 0xF5,
    "</think>": 0xF6,
    "<|tool_calls_section_begin|>": 0xF7,
    "<|tool_calls_section_end|>": 0xF8,
    "<|tool_call_begin|>": 0xF9,
    "<|tool_call_argument_begin|>": 0xFA,
    "<|tool_call_end|>": 0xFB,
}


class ByteChatTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 (except the seven above), K2's specials at fixed ids."""

    def __init__(self) -> None:
        super().__init__(BYTE_CHAT_SPECIAL_IDS)
        self.vocab_size = default_model.default_config().vocab_size
        self.bos_id = default_model.BOS_ID
        self.eos_id = default_model.EOS_ID

    @property
    def num_text_ids(self) -> int:
        return default_model.BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        # A lone surrogate (possible in JSON input) cannot be UTF-8: it becomes "?".
        return list(text.encode("utf-8", errors="replace"))

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < default_model.BYTE_VOCAB or self.is_special(token_id):
            raise ValueError(f"token id {token_id} is not a byte of the default model")
        return bytes([token_id])
