"""The command line on short inputs."""

from __future__ import annotations

import json

from selfextend_llm.cli import main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pretrained_context"] == 8192 and info["context_window"] == 32768


def test_ask_streams_an_answer(tmp_path, capsys):
    doc = tmp_path / "note.txt"
    doc.write_text("The meeting is on Tuesday at noon in room 42.")
    assert main(["ask", "--file", str(doc), "--max-new-tokens", "16", "Which", "room?"]) == 0
    assert "42" in capsys.readouterr().out


def test_ask_refuses_a_file_past_the_window(tmp_path, capsys):
    doc = tmp_path / "big.txt"
    doc.write_text("word " * 33_000)
    assert main(["ask", "--file", str(doc)]) == 2
    assert "longer than the context window" in capsys.readouterr().err
