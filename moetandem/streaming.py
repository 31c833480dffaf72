"""Incremental detokenization: turn generated token ids into printable text pieces as they arrive."""
from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


class TextStream:
    """Feed token ids one at a time; get back the new text each one completes.

    Decodes a short window (a few tokens of context + the pending ones) rather than everything so far, and prints
    the part beyond the context. A piece is held back while it ends in U+FFFD: with byte-level BPE one character can
    span several tokens, and printing early would print a replacement char. Seeding the context with the prompt's
    last tokens keeps the leading space SentencePiece tokenizers drop at the start of a decode. Special tokens are
    left out unless `skip_special` is False (gpt-oss's harmony markers are special tokens its parser needs)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), context: int = 6,
                 skip_special: bool = True) -> None:
        self.tokenizer, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = list(prompt_ids[-context:]) if context > 0 else []
        self.prefix = 0  # ids[prefix:read] is context already printed
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        """Add one generated id; returns the text it completes ('' while a character is still incomplete)."""
        self.ids.append(int(token))
        shown = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        if len(text) > len(shown) and not text.endswith(REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(shown):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (generation ended mid-character)."""
        shown = self._decode(self.prefix, self.read)
        text = self._decode(self.prefix, len(self.ids))
        self.prefix = self.read = len(self.ids)
        return text[len(shown):]

    def _decode(self, start: int, stop: int) -> str:
        if stop <= start:
            return ""
        return self.tokenizer.decode(self.ids[start:stop], skip_special_tokens=self.skip_special)
