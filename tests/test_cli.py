"""The command line on short inputs."""

from __future__ import annotations

import json

from selfextend_llm.cli import FAMILIES, main


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["pretrained_context"] == 8192 and info["context_window"] == 32768
    assert info["settings_source"] == "shipped table" and info["table"][0] == "<= 4,096: plain"


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


def test_passkey_grid_writes_table_json_and_heatmap(tmp_path, capsys):
    args = [
        "passkey",
        "--lengths",
        "600",
        "--depths",
        "2",
        "--prompts",
        "1",
        "--out-dir",
        str(tmp_path),
        "--methods",
        "plain",
        "yarn",
        "se:2,128",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 600 |" in out and "se:2,128" in out
    data = json.loads((tmp_path / "passkey.json").read_text())
    assert set(data["mean"]) == {"plain", "yarn", "se:2,128"}
    assert data["mean"]["plain"]["600"] == 1.0  # inside the trained window the plain model finds it
    assert (tmp_path / "passkey_heatmap.png").stat().st_size > 1000


def test_tune_saves_a_table_that_load_and_info_take(tmp_path, capsys):
    """The embedded default tuned at one short length on chosen candidates; the saved table is used when passed."""
    save = tmp_path / "table.json"
    args = ["tune", "--lengths", "700", "--depths", "1", "--prompts", "1", "--baselines", "yarn", "--save", str(save)]
    assert main([*args, "--candidates", "plain", "se:2,256", "se:3,256+log"]) == 0
    out = capsys.readouterr().out
    assert "| 700 |" in out and "yarn:" in out and str(save) in out
    table = json.loads(save.read_text())
    assert table["model"] == "SmolLM2-135M-Instruct" and [e["upto"] for e in table["entries"]] == [700]
    result = json.loads((tmp_path / "table" / "700.json").read_text())
    assert set(result["accuracy"]) == {"plain", "se:2,256", "se:3,256+log", "yarn"}
    # in the window the model finds every one-fact family; the chat families are measured by default (the model
    # has a template), but inside the window they rank no chat entry of their own
    plain, families = result["accuracy"]["plain"], FAMILIES
    assert all(plain[f] == 1.0 for f in families if "-keys" not in f)
    assert set(plain) == {*families, *(f"heldout/{f}" for f in families)}  # chosen, so validated held out
    assert set(result["accuracy"]["yarn"]) == {f"heldout/{f}" for f in families}  # the baseline: held out only
    assert table["entries"][0]["held_out"] == {t: v for t, v in plain.items() if t.startswith("heldout/")}
    assert "best_chat" not in result and "chat_entries" not in table
    assert main(["info", "--json", "--tuned-table", str(save)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["settings_source"].startswith(f"tuned file {save}") and len(info["table"]) == 1


def test_needle_grid(tmp_path, capsys):
    args = [
        "needle",
        "--lengths",
        "700",
        "--depths",
        "1",
        "--prompts",
        "2",
        "--out-dir",
        str(tmp_path),
        "--methods",
        "plain",
        "se:2,128",
        "--json",
    ]
    assert main(args) == 0
    mean = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(mean) == {"plain", "se:2,128"}
    assert (tmp_path / "needle_heatmap.png").is_file()


def test_perplexity_on_a_file(tmp_path, capsys):
    from selfextend_llm.tasks.documents import make_fact_document

    doc = tmp_path / "doc.txt"
    doc.write_text(make_fact_document(1_200, lambda s: len(s) // 4, seed=1)[0])
    args = [
        "perplexity",
        "--file",
        str(doc),
        "--lengths",
        "256",
        "512",
        "--methods",
        "plain",
        "se:4,64",
        "--out-dir",
        str(tmp_path),
        "--json",
    ]
    assert main(args) == 0
    curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(curve["plain"]) == {"256", "512"}
    assert all(1.0 < v < 1000 for points in curve.values() for v in points.values())
    # G=4, W=64 changes attention only past 64 tokens: it must give a different, finite perplexity
    assert curve["se:4,64"]["512"] != curve["plain"]["512"]
    assert (tmp_path / "perplexity.png").is_file()
