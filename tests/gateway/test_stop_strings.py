"""Stop strings on streamed text: found across pieces, never emitted, text before kept."""

from __future__ import annotations

from pagedserve.services.gateway.stop_strings import StopStringMatcher


def _run(stop: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    matcher = StopStringMatcher(stop)
    out = []
    for i, piece in enumerate(pieces):
        text, stopped = matcher.push(piece, final=i == len(pieces) - 1)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_stop_string_split_across_pieces_is_not_emitted() -> None:
    out, stopped = _run(["###"], ["Hello wor", "ld#", "#", "# more", "never"])
    assert stopped
    assert "".join(out) == "Hello world"
    assert not any("#" in piece for piece in out)


def test_partial_match_is_released_when_it_does_not_complete() -> None:
    out, stopped = _run(["###"], ["a#", "#b", "c"])
    assert not stopped
    assert out == ["a", "##b", "c"]


def test_text_held_back_is_released_at_the_end() -> None:
    out, stopped = _run(["STOP"], ["abc", "ST"])
    assert not stopped
    assert "".join(out) == "abcST"


def test_earliest_of_several_stop_strings_wins() -> None:
    out, stopped = _run(["world", "lo w"], ["hello world"])
    assert stopped
    assert out == ["hel"]


def test_overlapping_prefixes() -> None:
    out, stopped = _run(["aab"], ["a", "a", "a", "b", "zzz"])
    assert stopped
    assert "".join(out) == "a"


def test_no_stop_strings_passes_text_through() -> None:
    assert StopStringMatcher([]).push("anything") == ("anything", False)
    assert StopStringMatcher([""]).push("x") == ("x", False)
