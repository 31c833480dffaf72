"""A logits processor that forces a scripted token sequence: stands in for a model's generation in server tests
(tools, harmony), so the parsers see known text from a random model."""
from __future__ import annotations

from typing import Any, Sequence


class Script:
    """Allows only the next token of `ids` at each step (the last one repeats once the script is spent)."""

    def __init__(self, ids: Sequence[int]) -> None:
        self.ids, self.i = list(ids), 0

    def process(self, row: Any) -> Any:
        out = row.clone().fill_(float("-inf"))
        out[self.ids[min(self.i, len(self.ids) - 1)]] = 0.0
        return out

    def accept(self, token: int) -> None:
        self.i += 1
