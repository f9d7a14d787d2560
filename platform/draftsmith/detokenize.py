"""Incremental detokenization of one sequence's output: streamed text deltas and stop strings in O(new tokens).

Decoding the whole output after every token costs O(n) per token, O(n^2) per answer, and stalls every
sequence of the batch behind a long one. Here each token decodes only a short window: `decode(ids[prefix:])`
minus the text of `ids[prefix:read]` (the tokens before `read` give the new ones their context, e.g. a
leading space), the usual incremental detokenizer of vLLM and TGI. Text whose last character is incomplete
(decoded as U+FFFD) stays pending until a later token completes it. Stop strings are searched only in the
new text plus the len(stop) - 1 characters before it; the streamed text holds back a trailing U+FFFD and
any suffix that could begin a stop string. A finished sequence's text (`full_text`) is one full decode, as
a non-incremental engine would report it.

Semantics of the text: the output tokens minus `skip_ids` (end-of-sequence tokens), decoded by `decode`.
Not here: when a sequence finishes (specdec.py), tokenizers (models.py).
"""

from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str], *, skip_ids: frozenset[int] = frozenset(),
                 stops: Sequence[str] = ()):
        self._decode = decode
        self._skip = skip_ids
        self.stops = tuple(stops)
        self._hold = max(map(len, self.stops), default=1) - 1  # characters that could begin a stop string
        self.ids: list[int] = []
        self._prefix = self._read = 0  # ids[prefix:read]: context of the pending ids; ids[read:]: pending
        self._prefix_text = ""  # decode(ids[prefix:read])
        self._chunks: list[str] = []  # finalized text, in order (joined only when a stop string cuts it)
        self._final_len = 0
        self._tail, self._tail_start = "", 0  # finalized text from _tail_start on (what deltas still read)
        self._pending = ""  # text of ids[read:], ending in an incomplete character
        self._checked = 0  # finalized text before this was searched for stop strings
        self._sent = 0  # characters streamed
        self.stopped: str | None = None  # the text before the first stop string, once one appeared

    def add(self, token: int) -> bool:
        """Append one token; True when the text now contains a stop string (the first time only)."""
        if token in self._skip:
            return False
        self.ids.append(token)
        window = self._decode(self.ids[self._prefix:])
        self._pending = window[len(self._prefix_text):]
        if self._pending and not self._pending.endswith("\ufffd"):
            self._finalize(self._pending)
            self._pending = ""
            self._prefix, self._read = self._read, len(self.ids)
            self._prefix_text = self._decode(self.ids[self._prefix:self._read])
        return bool(self.stops) and self.stopped is None and self._find_stop()

    def stream_delta(self) -> str:
        """The text not streamed yet, holding back an incomplete character and a possible stop-string start."""
        start = max(self._tail_start, self._sent - self._hold)
        visible = _hold_back(self._text_from(start), self.stops)
        delta = visible[self._sent - start:]
        self._sent = max(self._sent, start + len(visible))
        self._trim()
        return delta

    def full_text(self) -> str:
        """The text of every token so far, in one full decode (a finished sequence's text)."""
        return self._decode(self.ids)

    def final_delta(self, text: str) -> str:
        """What a finished sequence streams last: its final `text` past what was streamed."""
        delta, self._sent = text[self._sent:], max(self._sent, len(text))
        return delta

    # ----- internals ---------------------------------------------------------------------------------
    def _finalize(self, text: str) -> None:
        self._chunks.append(text)
        self._tail += text
        self._final_len += len(text)

    def _text_from(self, start: int) -> str:
        """(finalized + pending text)[start:], for start >= _tail_start."""
        if start >= self._final_len:
            return self._pending[start - self._final_len:]
        return self._tail[start - self._tail_start:] + self._pending

    def _find_stop(self) -> bool:
        start = max(self._tail_start, self._checked - self._hold)
        text = self._text_from(start)
        self._checked = self._final_len
        cuts = [cut for cut in (text.find(stop) for stop in self.stops) if cut >= 0]
        if cuts:  # the earliest of the stops the new text completed, whatever their order in the list
            self.stopped = "".join(self._chunks)[:start] + text[:min(cuts)]
            return True
        self._trim()
        return False

    def _trim(self) -> None:
        """Drop finalized text no later delta or stop search reads (keeps every call O(new text))."""
        checked = self._checked if self.stops else self._final_len
        keep = min(self._final_len, max(0, min(self._sent, checked) - self._hold))
        if keep > self._tail_start:
            self._tail = self._tail[keep - self._tail_start:]
            self._tail_start = keep


def _hold_back(text: str, stops: Sequence[str]) -> str:
    """Text safe to stream: without a trailing partial UTF-8 char or a prefix of a stop string."""
    text = text.rstrip("\ufffd")
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return text[: len(text) - length]
    return text
