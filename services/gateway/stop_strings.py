"""Stop strings, matched on detokenized text as it streams.

The scheduler stops on token ids (EOS, stop_token_ids); a stop *string* can span tokens
and even steps ("###" arriving as "#", "##"), so it is found here, on text. Text that
might be the start of a stop string is held back until the next piece decides it, so a
client never receives text that later turns out to belong to a stop string. The output
ends just before the stop string, which is not included.
"""

from __future__ import annotations


class StopStringMatcher:
    """Invariant: `_pending` is the longest suffix of the text seen so far that is a
    proper prefix of some stop string; everything before it has been released. So any
    occurrence of a stop string starts inside `_pending` + the new text."""

    def __init__(self, stop: list[str]) -> None:
        self._stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self._stop), default=0)
        self._pending = ""

    def push(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string ended the output). With
        `final`, nothing more comes, so held-back text is released."""
        if not self._stop:
            return text, False
        buffer = self._pending + text
        first_match = min((i for i in (buffer.find(s) for s in self._stop) if i >= 0), default=-1)
        if first_match >= 0:
            self._pending = ""
            return buffer[:first_match], True
        hold = 0 if final else self._partial_match_length(buffer)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def _partial_match_length(self, buffer: str) -> int:
        for length in range(min(len(buffer), self._longest - 1), 0, -1):
            suffix = buffer[-length:]
            if any(s.startswith(suffix) for s in self._stop):
                return length
        return 0
