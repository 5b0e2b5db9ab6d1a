"""Stop strings: finding them, and holding streamed text back while it could still become one."""

from __future__ import annotations

import pytest

from selfextend_llm.stopping import emittable, find_stop, normalize_stops


def test_stop_helpers():
    assert normalize_stops("x") == ["x"]
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert emittable("abc<|e", ["<|end|>"]) == 3
    assert emittable("abc", ["zz"]) == 3
    with pytest.raises(TypeError):
        normalize_stops([1])


def _stream(pieces, stops):
    from selfextend_llm.stopping import StopScan, visible_pieces

    scan = StopScan()
    return list(visible_pieces(iter(pieces), stops, scan)), scan


def test_visible_pieces_hold_back_a_stop_string_split_across_pieces():
    shown, scan = _stream(["Hello <", "|e", "nd|> never shown"], ["<|end|>"])
    assert "".join(shown) == "Hello " and scan.stopped
    assert scan.text == "Hello <|end|> never shown"


def test_visible_pieces_release_a_false_alarm_and_the_tail():
    shown, scan = _stream(["a <", "|x", " b <|"], ["<|end|>"])
    assert shown == ["a ", "<|x", " b ", "<|"]  # the last '<|' is released when the stream ends
    assert not scan.stopped


def test_visible_pieces_stop_reading_once_stopped():
    read = []

    def pieces():
        for p in ["one STOP", "two", "three"]:
            read.append(p)
            yield p

    from selfextend_llm.stopping import visible_pieces

    assert list(visible_pieces(pieces(), ["STOP"])) == ["one "]
    assert read == ["one STOP"]  # the producer is not drained past the stop


def test_visible_pieces_without_stops_pass_everything_through():
    shown, scan = _stream(["a", "", "b"], [])
    assert shown == ["a", "b"] and scan.text == "ab" and not scan.stopped
