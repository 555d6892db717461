"""Streaming decoding: the text of token ids that arrive a few at a time, each character
printed whole and once (``gatedfwa generate`` prints through it, gatedfwa/cli/generate.py)."""

from __future__ import annotations

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Text of ids that arrive a few at a time (a streamer's ``put``): each call returns
    only the new text. The ids since the last restart are decoded together (tokens of a
    Hugging Face tokenizer may merge with their neighbours when decoded), and text that
    ends in U+FFFD waits for the next ids: a character whose bytes are split across tokens
    is printed whole, once. :meth:`flush` returns what is left at the end (an incomplete
    character as U+FFFD).

    ``decode``: list of ids -> str. ``independent``: True when text decoded piece by piece,
    cut after any complete character, equals the text decoded at once (bytes, ids printed as
    numbers); then every call starts afresh. Otherwise the ids start afresh after a newline,
    so decoding stays short."""

    def __init__(self, decode, independent: bool = False):
        self._decode = decode
        self._independent = independent
        self._ids: list[int] = []
        self._printed = 0  # characters of decode(self._ids) already returned

    def __call__(self, ids) -> str:
        self._ids.extend(int(i) for i in ids)
        text = self._decode(self._ids)
        if text.endswith("\ufffd"):  # an incomplete character, or an invalid byte: wait for more
            return ""
        new = text[self._printed:]
        if self._independent or text.endswith("\n"):
            self._ids, self._printed = [], 0
        else:
            self._printed = len(text)
        return new

    def flush(self) -> str:
        new = self._decode(self._ids)[self._printed:]
        self._ids, self._printed = [], 0
        return new
