"""Character-level tokenizer: one token per character of the training text.

The vocabulary is the sorted set of characters of the corpus, so ids are stable for a given text
and the whole vocabulary travels inside every checkpoint (see gpt/checkpoint.py).
"""

from __future__ import annotations

MAX_REPORTED_CHARACTERS = 10


class UnknownCharacterError(ValueError):
    """Text holds characters that are not in the vocabulary."""

    def __init__(self, characters: list[str]) -> None:
        self.characters = characters
        shown = ", ".join(repr(c) for c in characters[:MAX_REPORTED_CHARACTERS])
        more = len(characters) - MAX_REPORTED_CHARACTERS
        suffix = f" and {more} more" if more > 0 else ""
        super().__init__(f"characters not in the vocabulary: {shown}{suffix}")


class CharTokenizer:
    """Maps each character of a fixed vocabulary to its index in the sorted vocabulary."""

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("the vocabulary must be sorted distinct characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def unknown_characters(self, text: str) -> list[str]:
        """The distinct characters of `text` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise UnknownCharacterError(self.unknown_characters(text)) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)
