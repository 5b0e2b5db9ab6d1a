"""``selfextend-llm tune``: candidates, the choice rule, merging runs, and the whole loop on a model that is
not the embedded default (a tiny random Llama saved as a folder), found again by ``load()``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from selfextend_llm.config import MAX_MEASURED_GROUP, SelfExtendConfig
from selfextend_llm.search import (
    ANSWER_MARGIN,
    LengthResult,
    build_table,
    candidates,
    chat_tasks,
    default_tasks,
    held_out_twins,
    method_name,
    raw_tasks,
)


@pytest.mark.parametrize("trained", [128, 2048, 8192, 32768])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.5, 4.0, 16.0])
def test_candidates_reach_their_length_and_stay_in_measured_range(trained, factor):
    n = int(trained * factor)
    found = candidates(trained, n)
    assert found
    assert (None in found) == (n <= trained)  # plain only where the prompt fits
    for cfg in found:
        if cfg is None:
            continue
        assert cfg.max_context(trained) >= n + ANSWER_MARGIN
        assert cfg.group_size <= MAX_MEASURED_GROUP and cfg.neighbor_window < trained
        assert cfg.neighbor_window < n + ANSWER_MARGIN  # else it would be exactly plain, run twice
        assert (cfg.log_scale > 0) == (n > trained)  # log on past the window by default
    far = candidates(trained, 4 * trained)
    assert {c.log_scale for c in far} == {0.5, 1.0}  # at half and full strength: round 8's and LongLM's
    for cfg in far:  # every grouping at both strengths, so the search compares like with like
        assert dataclasses.replace(cfg, log_scale=1.5 - cfg.log_scale) in far
    both = candidates(trained, 4 * trained, log="both")
    assert {c.log_scale for c in both} == {0.0, 0.5, 1.0}
    assert {c.log_scale for c in candidates(trained, 4 * trained, strengths=[2])} == {2.0}
    with pytest.raises(ValueError, match="log must be"):
        candidates(trained, n, log="yes")
    for bad in ([], [0], [-1], [float("nan")]):
        with pytest.raises(ValueError, match="log strengths must be positive.*log='off'"):
            candidates(trained, 4 * trained, strengths=bad)


def test_candidates_past_the_window_include_small_windows_and_large_groups():
    # the chat pass key's best on the embedded default (12k: G8 W256, 16k: G12 W512) lies there
    found = {(c.group_size, c.neighbor_window) for c in candidates(8192, 12288)}
    assert {(8, 256), (4, 256)} <= found and {w for _, w in found} == {256, 512, 1024, 2048, 4096}
    assert (12, 512) in {(c.group_size, c.neighbor_window) for c in candidates(8192, 16384)}
    assert all(w >= 16 for _, w in {(c.group_size, c.neighbor_window) for c in candidates(128, 512)})


def test_every_family_is_a_default_task_with_a_template_and_chat_families_rank_chat_entries(default_model, monkeypatch):
    families = default_tasks(default_model)
    assert len(families) == 8 and {f.endswith("-chat") for f in families} == {True, False}
    assert held_out_twins(families) == [f"heldout/{f}" for f in families]
    assert held_out_twins(["passkey", "prose-key"]) == ["heldout/prose-key"]  # the older tasks have no twin
    three = ["passkey", "needle", "chat"]
    assert raw_tasks(three) == ["passkey", "needle"] and raw_tasks(["chat"]) == ["chat"]
    # inside the window (the whole window included) chat calls take the main entry: plain's perplexity matters
    assert chat_tasks(three, 4096, 8192) is None and chat_tasks(three, 8192, 8192) is None
    assert chat_tasks(three, 8193, 8192) == ["chat"]  # ranked on the chat tasks alone (their worst)
    assert chat_tasks(families, 16384, 8192) == [f for f in families if f.endswith("-chat")]
    assert chat_tasks(["passkey", "needle"], 16384, 8192) is None
    monkeypatch.setattr(default_model.tokenizer, "chat_template", None)
    assert default_tasks(default_model) == [f for f in families if not f.endswith("-chat")]


def test_choice_is_the_worst_one_fact_task_then_the_worst_then_the_mean_then_plain_and_wider_windows():
    three = ("filler-key", "prose-key", "prose-keys")  # two one-fact families and a multi-key one

    def acc(*values: float) -> dict[str, float]:
        return dict(zip(three, values, strict=True))

    r = LengthResult(
        16384,
        accuracy={
            "se:9,1024": acc(1.0, 0.4, 0.5),  # best mean, but misses prose keys: overfit to filler
            "se:6,4096": acc(0.75, 0.65, 0.2),  # worst one-fact 0.65: chosen
            "se:6,4096+log": acc(0.85, 0.55, 0.3),
            "se:4,2048": acc(0.95, 0.55, 0.3),  # same worsts as +log, better mean
            "se:3,1024": acc(1.0, 1.0, 1.0),  # best, but only screened
            "dynamic-ntk": acc(1.0, 0.9, 0.9),  # a baseline is never chosen
        },
        prompts={m: dict.fromkeys(three, 20) for m in ("se:9,1024", "se:6,4096", "se:6,4096+log", "se:4,2048")}
        | {"se:3,1024": dict.fromkeys(three, 5), "dynamic-ntk": dict.fromkeys(three, 20)},
    )
    assert r.choose(20) == "se:6,4096"
    del r.accuracy["se:6,4096"]
    assert r.choose(20) == "se:4,2048"  # same worsts: the mean decides
    r.accuracy["se:6,4096+log"] = acc(0.95, 0.55, 0.3)  # all the same: the wider window
    assert r.choose(20) == "se:6,4096+log"
    r.accuracy["se:6,4096+log"]["prose-keys"] = 0.25  # same one-fact worst, a weaker multi-key family
    assert r.choose(20) == "se:4,2048"
    # the held-out split never takes part in a choice, however it went
    r.accuracy["se:9,1024"]["heldout/prose-key"], r.prompts["se:9,1024"]["heldout/prose-key"] = 1.0, 20
    r.accuracy["se:4,2048"]["heldout/prose-key"], r.prompts["se:4,2048"]["heldout/prose-key"] = 0.0, 20
    assert r.choose(20) == "se:4,2048" and r.worst("se:4,2048") == 0.3
    assert r.held_out("se:4,2048") == {"heldout/prose-key": 0.0} and r.held_out("se:6,4096+log") == {}
    r.rule = "mean"  # the rule rounds 1-8 of the shipped table were chosen by: the mean first
    assert r.choose(20) == "se:9,1024"
    r.rule = "best"
    with pytest.raises(ValueError, match="rank rule must be 'worst' or 'mean'"):
        r.choose(20)
    old = LengthResult(
        16384,
        accuracy={"se:9,1024": {"passkey": 1.0, "needle": 0.4}, "se:6,4096": {"passkey": 0.75, "needle": 0.65}},
        prompts={m: {"passkey": 20, "needle": 20} for m in ("se:9,1024", "se:6,4096")},
    )
    assert old.choose(20) == "se:9,1024"  # the pass key is the one-fact task; the needle comes after it
    tie = LengthResult(
        4096,
        accuracy={"plain": {"passkey": 1.0}, "se:2,2048": {"passkey": 1.0}, "se:2,1024": {"passkey": 1.0}},
        prompts={m: {"passkey": 20} for m in ("plain", "se:2,2048", "se:2,1024")},
    )
    assert tie.choose(20) == "plain"
    del tie.accuracy["plain"]
    assert tie.choose(20) == "se:2,2048"
    with pytest.raises(ValueError, match="no setting was measured on 40 prompts"):
        tie.choose(40)


def test_merged_runs_are_ranked_only_among_settings_measured_on_every_task_asked():
    # round A measured two settings on pass key and needle; round B one of them again, and a new one, on chat too
    a = LengthResult(
        12288,
        {"se:12,1024": {"passkey": 1.0, "needle": 0.35}, "se:6,2048": {"passkey": 1.0, "needle": 0.6}},
        {"se:12,1024": {"passkey": 20, "needle": 20}, "se:6,2048": {"passkey": 20, "needle": 20}},
    )
    b = LengthResult(
        12288,
        {"se:12,1024": {"passkey": 0.95, "chat": 0.25}, "se:8,256": {"passkey": 1.0, "needle": 0.45, "chat": 0.95}},
        {"se:12,1024": {"passkey": 5, "chat": 20}, "se:8,256": {"passkey": 20, "needle": 20, "chat": 20}},
    )
    merged = a.merged(b)
    # task by task: the pass key on 20 prompts stays, the chat measurement joins it
    assert merged.accuracy["se:12,1024"] == {"passkey": 1.0, "needle": 0.35, "chat": 0.25}
    assert merged.prompts["se:12,1024"] == {"passkey": 20, "needle": 20, "chat": 20}
    assert a.accuracy["se:12,1024"] == {"passkey": 1.0, "needle": 0.35}  # the inputs are not changed
    three = ["passkey", "needle", "chat"]
    # se:6,2048 has the best two-task mean but was never asked through the chat template: not a finalist
    assert merged.choose(20, three) == "se:8,256"
    assert merged.choose(20, ["passkey", "needle"]) == "se:6,2048"
    assert merged.score("se:12,1024", three) == round((1.0 + 0.35 + 0.25) / 3, 6)
    with pytest.raises(ValueError, match="on every task of passkey, yarn"):
        merged.choose(20, ["passkey", "yarn"])


def test_merging_keeps_the_measurement_on_more_prompts_and_builds_a_reaching_table():
    screened = LengthResult(8192, {"se:2,4096": {"passkey": 1.0}}, {"se:2,4096": {"passkey": 5}})
    full = LengthResult(
        8192,
        {"se:2,4096": {"passkey": 0.9}, "plain": {"passkey": 0.4}},
        {"se:2,4096": {"passkey": 20}, "plain": {"passkey": 20}},
    )
    merged = screened.merged(full)
    assert merged.accuracy["se:2,4096"] == {"passkey": 0.9} and merged.prompts["plain"] == {"passkey": 20}
    assert full.merged(screened).accuracy["se:2,4096"] == {"passkey": 0.9}
    with pytest.raises(ValueError, match="cannot merge"):
        screened.merged(LengthResult(4096))
    far = LengthResult(65536, {"se:32,4096+log": {"passkey": 0.6}}, {"se:32,4096+log": {"passkey": 20}})
    table = build_table("m", 8192, [far, merged])
    assert [e.upto for e in table.entries] == [8192, 65536]
    assert table.chat_entries == []  # no length was ranked for chat calls: no chat list
    far.accuracy["se:24,256"], far.prompts["se:24,256"] = {"passkey": 0.85}, {"passkey": 20}
    far.best, far.best_chat = "se:32,4096+log", "se:24,256"
    table = build_table("m", 8192, [far, merged])
    # one chat entry per length; a length without its own chat choice repeats its main entry
    assert [(e.upto, e.config) for e in table.chat_entries] == [
        (8192, table.entries[0].config),
        (65536, SelfExtendConfig(24, 256)),
    ]
    assert LengthResult.from_json(far.to_json()).best_chat == "se:24,256"
    assert table.entries[1].config == SelfExtendConfig(32, 4096, True) and table.entries[1].accuracy == {"passkey": 0.6}
    assert method_name(table.entries[0].config) == "se:2,4096" and method_name(None) == "plain"


def test_tune_any_model_saves_a_table_that_load_and_info_use(tiny_folder, tmp_path, monkeypatch, capsys):
    import selfextend_llm
    from selfextend_llm import search
    from selfextend_llm.cli import main

    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path / "cache"))
    args = ["tune", "--model", str(tiny_folder), "--lengths", "100", "300", "--depths", "1", "--prompts", "2"]
    args += ["--keep", "1", "--baselines", "yarn", "plain", "--json", "--tasks", "passkey", "needle", "chat"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    saved = tmp_path / "cache" / "tuned" / "tiny-llama.json"
    assert out["saved"] == str(saved) and saved.is_file()
    table = json.loads(saved.read_text())
    assert table["model"] == "tiny-llama" and table["pretrained_context"] == 128
    assert [e["upto"] for e in table["entries"]] == [100, 300]
    far = table["entries"][1]
    assert (far["neighbor_window"] - 1) + 0 < 300 and (128 - far["neighbor_window"]) * far["group_size"] + far[
        "neighbor_window"
    ] >= 300 + ANSWER_MARGIN
    per_length = json.loads((tmp_path / "cache" / "tuned" / "tiny-llama" / "300.json").read_text())
    assert "yarn" in per_length["accuracy"] and "plain" not in per_length["accuracy"]  # plain only in-window
    searched = [m for m in per_length["accuracy"] if m.startswith("se:")]  # generated: half and full log strength
    assert {m.endswith("+log0.5") for m in searched} == {True, False} and all("+log" in m for m in searched)
    # the tiny model has a chat template: the chat pass key is a default task, and past the window it
    # ranks a chat entry of its own
    assert per_length["prompts"][per_length["best"]] == {"passkey": 2, "needle": 2, "chat": 2}
    assert (
        per_length["best_chat"] in per_length["accuracy"]
        and per_length["prompts"][per_length["best_chat"]]["chat"] == 2
    )
    assert [e["upto"] for e in table["chat_entries"]] == [100, 300]
    assert table["chat_entries"][0] == table["entries"][0]  # inside the window chat calls take the main entry

    se = selfextend_llm.load(str(tiny_folder), device="cpu")
    info = se.describe()
    assert info["settings_source"].startswith(f"tuned file {saved}")
    assert se.plan.config_for(250) == SelfExtendConfig(far["group_size"], far["neighbor_window"], far["log_scale"])
    assert info["table"][1].startswith("<= 300: G")
    assert main(["info", "--model", str(tiny_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["settings_source"] == info["settings_source"]

    # a second run reads the per-length results back instead of generating again
    def no_generation(*a, **k):
        raise AssertionError("a finished length was run again")

    monkeypatch.setattr(search, "generate_raw", no_generation)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["table"] == table


def test_tune_refuses_bad_candidates_and_lengths(tiny_folder, tmp_path, monkeypatch, capsys):
    from selfextend_llm.cli import main

    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path / "cache"))
    base = ["tune", "--model", str(tiny_folder), "--no-save", "--depths", "1", "--prompts", "1"]
    assert main([*base, "--lengths", "8"]) == 2
    assert "at least 16" in capsys.readouterr().err
    assert main([*base, "--lengths", "300", "--candidates", "selfextend"]) == 2
    assert "takes plain or se:G,W" in capsys.readouterr().err
    assert main([*base, "--lengths", "300", "--candidates", "se:2,32"]) == 2  # reach 224 < 300: nothing left
    assert "no setting reaches 300 tokens" in capsys.readouterr().err
    assert main([*base, "--lengths", "300", "--log-strengths", "0"]) == 2
    assert "log strengths must be positive" in capsys.readouterr().err


def test_chat_task_asks_through_the_template_at_the_asked_length(default_model):
    """The chat task's prompt is chat messages of about the asked length, with the key inside, as a chain sends it."""
    from selfextend_llm.evaluation import TASKS, check_tasks

    messages, key = TASKS["chat"].make(default_model, 1500, 0.5, 3)
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[1]["content"].endswith("What is the pass key?") and f"pass key is {key}" in messages[1]["content"]
    assert abs(default_model.count_tokens(messages) - 1500) <= 40
    raw, raw_key = TASKS["passkey"].make(default_model, 1500, 0.5, 3)
    assert raw_key == key and isinstance(raw, str)  # same seed, same key: the two tasks differ only in the asking
    check_tasks(default_model, ["passkey", "needle", "chat"])
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['chats'\]"):
        check_tasks(default_model, ["chats"])


def test_chat_task_without_a_system_role_or_a_template(default_model, monkeypatch):
    from selfextend_llm.evaluation import TASKS, check_tasks
    from selfextend_llm.tasks.passkey import CHAT_INSTRUCTION

    monkeypatch.setitem(default_model.__dict__, "supports_system_role", False)  # as Gemma's templates
    (only_user,), key = TASKS["chat"].make(default_model, 600, 0.5, 3)
    assert only_user["role"] == "user" and only_user["content"].startswith(f"{CHAT_INSTRUCTION}\n\n")
    assert only_user["content"].endswith("\n\nWhat is the pass key?") and f"pass key is {key}" in only_user["content"]
    monkeypatch.setattr(default_model.tokenizer, "chat_template", None)
    with pytest.raises(ValueError, match="no chat template, so the chat task cannot run: drop it"):
        check_tasks(default_model, ["passkey", "chat"])
    check_tasks(default_model, ["passkey", "needle"])


def test_tune_scores_the_chat_task_when_asked(tiny_folder, tmp_path, monkeypatch, capsys):
    from selfextend_llm import search
    from selfextend_llm.cli import main

    asked: list[tuple[object, int]] = []
    real = search.generate_raw

    def spy(se, prompts, max_new_tokens):
        asked.extend((p, max_new_tokens) for p in prompts)
        return real(se, prompts, max_new_tokens)

    monkeypatch.setattr(search, "generate_raw", spy)
    out_dir = tmp_path / "runs"
    args = ["tune", "--model", str(tiny_folder), "--lengths", "300", "--depths", "1", "--prompts", "1", "--no-save"]
    args += ["--tasks", "passkey", "chat", "--candidates", "se:4,32", "--baselines", "--out-dir", str(out_dir)]
    assert main(args) == 0
    result = json.loads((out_dir / "300.json").read_text())
    assert set(result["accuracy"]["se:4,32"]) == {"passkey", "chat"}
    chats = [(p, n) for p, n in asked if isinstance(p, list)]
    assert len(chats) == 1 and chats[0][1] == 16 and chats[0][0][-1]["content"].endswith("What is the pass key?")


def test_chat_calls_run_with_the_tables_chat_entry_and_raw_calls_with_the_main_one(tiny_folder, tmp_path, monkeypatch):
    import selfextend_llm
    from selfextend_llm.tuning import TableEntry, TunedTable, tuned_path

    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path / "cache"))
    raw_cfg, chat_cfg = SelfExtendConfig(4, 32), SelfExtendConfig(8, 16)
    TunedTable("tiny-llama", 128, [TableEntry(400, raw_cfg)], chat_entries=[TableEntry(400, chat_cfg)]).save(
        tuned_path("tiny-llama")
    )
    se = selfextend_llm.load(str(tiny_folder), device="cpu")
    assert se.describe()["chat_table"] == ["<= 400: G8 W16"] and se.describe()["table"] == ["<= 400: G4 W32"]
    used: list[SelfExtendConfig | None] = []
    real = se.use_grouping
    monkeypatch.setattr(se, "use_grouping", lambda cfg: (used.append(cfg), real(cfg))[1])
    text = "word " * 150  # past the 128-token window
    se.complete(text, max_new_tokens=2)
    se.complete([{"role": "user", "content": text}], max_new_tokens=2)
    list(se.stream([{"role": "user", "content": text}], max_new_tokens=2))
    assert used == [raw_cfg, chat_cfg, chat_cfg]
    # the continuous batcher (the server, concurrent framework calls) chooses the same way
    batcher = se.batcher()
    try:
        chat_request = batcher.submit([{"role": "user", "content": text}], max_new_tokens=2)
        raw_request = batcher.submit(text, max_new_tokens=2)
        chat_request.result(), raw_request.result()
    finally:
        batcher.close()
    assert chat_cfg in used[3:] and raw_cfg in used[3:]


def test_a_search_cut_off_mid_length_resumes_from_its_journal(tiny_folder, tmp_path, monkeypatch):
    """A killed run (time limit, lost machine) keeps every prompt it scored: the rerun generates only the
    rest and ends with the same result as a run that was never cut off."""
    import selfextend_llm
    from selfextend_llm import search

    se = selfextend_llm.load(str(tiny_folder), device="cpu")
    real = search.generate_raw
    asked: list[object] = []

    def spy(se, prompts, max_new_tokens):
        if limit is not None and len(asked) >= limit:
            raise RuntimeError("the machine was taken back")
        asked.extend(prompts)
        return real(se, prompts, max_new_tokens)

    monkeypatch.setattr(search, "generate_raw", spy)
    kw = dict(tasks=["passkey", "needle"], depths=2, prompts=2, screen=1, keep=1, progress=False, batch_size=1)
    kw["settings"] = [SelfExtendConfig(4, 32), SelfExtendConfig(8, 16)]

    limit = None
    _, (whole,) = search.tune(se, [300], out_dir=tmp_path / "whole", **kw)
    n_whole = len(asked)
    assert n_whole == 2 * 2 * 2 + 1 * 2 * 2 * 1  # screen: 2 settings x 2 tasks x 2 depths; then 1 kept x 2 more

    asked.clear()
    limit = 5
    with pytest.raises(RuntimeError, match="taken back"):
        search.tune(se, [300], out_dir=tmp_path / "cut", **kw)
    journal = tmp_path / "cut" / search.JOURNAL
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    assert len(lines) == 5 and not (tmp_path / "cut" / "300.json").exists()
    assert {(c["model"], c["device"], c["dtype"], c["seed"]) for c in lines} == {("tiny-llama", "cpu", "float32", 0)}

    asked.clear()
    limit = None
    journal.write_text(journal.read_text() + '{"model": "tiny-llama", "meth')  # a line torn by the kill
    _, (resumed,) = search.tune(se, [300], out_dir=tmp_path / "cut", **kw)
    assert len(asked) == n_whole - 5
    assert (resumed.accuracy, resumed.prompts, resumed.best) == (whole.accuracy, whole.prompts, whole.best)

    # another seed shares the folder but none of its cells
    asked.clear()
    search.tune(se, [300], out_dir=tmp_path / "cut2", **kw)  # fresh folder: all cells
    (tmp_path / "cut2" / "300.json").unlink()
    asked.clear()
    search.tune(se, [300], out_dir=tmp_path / "cut2", seed=1, **kw)
    assert len(asked) == n_whole


def test_the_perplexity_guard_rules_out_in_window_settings_above_plain_on_any_text():
    both = {"passkey": 20, "needle": 20}
    r = LengthResult(
        8192,
        accuracy={
            "plain": {"passkey": 0.4, "needle": 0.4},
            "se:2,4096": {"passkey": 0.95, "needle": 0.65},  # best on accuracy, 0.14 above plain on one text
            "se:2,6144": {"passkey": 0.6, "needle": 0.55},
            "se:3,7168": {"passkey": 0.55, "needle": 0.5},
            "se:4,2048": {"passkey": 1.0, "needle": 1.0},  # never measured by the guard: not chosen
        },
        prompts={m: both for m in ("plain", "se:2,4096", "se:2,6144", "se:3,7168", "se:4,2048")},
        perplexity={
            "plain": {"prose": 10.27, "code": 3.10},
            "se:2,4096": {"prose": 10.41, "code": 3.05},
            "se:2,6144": {"prose": 10.275, "code": 3.10},
            "se:3,7168": {"prose": 10.27, "code": 3.09},
        },
        perplexity_tolerance=0.01,
    )
    assert [m for m in r.accuracy if r.keeps_perplexity(m)] == ["plain", "se:2,6144", "se:3,7168"]
    assert r.choose(20) == "se:2,6144"
    again = LengthResult.from_json(json.loads(json.dumps(r.to_json())))
    assert (again.perplexity, again.perplexity_tolerance, again.choose(20)) == (r.perplexity, 0.01, "se:2,6144")
    r.perplexity["se:2,6144"]["code"] = 3.2  # above plain on the second text only
    r.perplexity["se:3,7168"]["prose"] = 10.3
    assert r.choose(20) == "plain"  # plain always passes: an in-window length can fall back to it
    del r.accuracy["plain"]
    with pytest.raises(ValueError, match=r"within the perplexity guard \(se:2,4096, se:2,6144, se:3,7168, se:4,2048"):
        r.choose(20)
    # a run without the guard (past the window, or turned off) ranks on accuracy alone, and merging
    # a guard-only measurement into it brings the guard along
    plain_run = LengthResult(8192, accuracy={m: a for m, a in r.accuracy.items()}, prompts=dict(r.prompts))
    assert plain_run.choose(20) == "se:4,2048"
    guard_only = LengthResult(8192, perplexity={"plain": {"prose": 10.27}, "se:2,6144": {"prose": 10.27}})
    guard_only.perplexity_tolerance = 0.01
    merged = plain_run.merged(guard_only)
    assert merged.perplexity_tolerance == 0.01 and merged.choose(20) == "se:2,6144"


def test_tune_guards_in_window_lengths_on_perplexity(tiny_folder, tmp_path, monkeypatch, capsys):
    """Inside the window ``tune`` measures plain and the finalists on the guard's texts and never picks a
    setting above plain there; past the window no guard runs; bad guard input is refused with what to change."""
    import selfextend_llm
    from selfextend_llm import search
    from selfextend_llm.cli import main

    se = selfextend_llm.load(str(tiny_folder), device="cpu")
    text = " ".join(f"word{i % 97} and then some more words" for i in range(400))
    kw = dict(tasks=["passkey"], depths=1, prompts=1, keep=2, progress=False, perplexity_texts={"t": text})
    kw["settings"] = [None, SelfExtendConfig(4, 16), SelfExtendConfig(2, 32)]
    _, (inside, past) = search.tune(se, [100, 300], **kw)
    assert inside.perplexity_tolerance == 0.01 and set(inside.perplexity) >= {"plain", inside.best}
    ppl = inside.perplexity
    for m in ppl:  # the guard's figures are the model's real perplexity on the text's first 100 tokens
        ids = se.encode(text)[:100]
        assert ppl[m]["t"] == pytest.approx(search.perplexity(se, ids, search.Method.parse(m)), rel=1e-5)
    assert ppl[inside.best]["t"] <= ppl["plain"]["t"] + 0.01
    assert not past.perplexity and past.perplexity_tolerance is None

    # settings above plain on the text are never chosen, whatever their accuracy
    monkeypatch.setattr(search.PerplexityGuard, "measure", lambda self, se, m, n: {"t": 5.0 if m == "plain" else 6.0})
    monkeypatch.setattr(search, "generate_raw", lambda se, prompts, n: [str(p) for p in prompts])  # every key found
    _, (inside,) = search.tune(se, [100], **kw)
    assert inside.best == "plain" and inside.accuracy["se:2,32"]["passkey"] == 1.0

    with pytest.raises(ValueError, match=r"shorter than the longest in-window length, 100"):
        search.tune(se, [100], **{**kw, "perplexity_texts": {"short": "a few words"}})
    base = ["tune", "--model", str(tiny_folder), "--no-save", "--lengths", "100", "--depths", "1", "--prompts", "1"]
    assert main([*base, "--perplexity-text", str(tmp_path / "missing.txt")]) == 2
    assert "perplexity text(s) not found" in capsys.readouterr().err
    assert main([*base, "--perplexity-tolerance", "-1"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err


def test_in_window_candidates_include_the_wide_windows_the_perplexity_guard_keeps():
    found = candidates(8192, 8192)
    assert found[0] is None  # plain
    settings = {(c.group_size, c.neighbor_window) for c in found[1:]}
    assert {(2, 6144), (2, 7168), (3, 7168), (2, 4096)} <= settings
    assert all(c.neighbor_window < 8192 + ANSWER_MARGIN for c in found[1:])  # none is plain in disguise
    short = candidates(4096 * 2, 4096)
    assert all(c.neighbor_window < 4096 + ANSWER_MARGIN for c in short[1:]) and (2, 6144) not in {
        (c.group_size, c.neighbor_window) for c in short[1:]
    }


def test_settings_spell_their_log_strength_and_parse_back():
    """``se:G,W+log`` is strength 1, ``+log0.5`` half of it; the search's names parse back to the same setting."""
    from selfextend_llm.evaluation import Method

    for strength in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0):
        cfg = SelfExtendConfig(16, 256, log_scale=strength)
        assert Method.parse(method_name(cfg)).config == cfg
    assert method_name(SelfExtendConfig(16, 256, log_scale=True)) == "se:16,256+log"
    assert method_name(SelfExtendConfig(32, 4096, log_scale=0.5)) == "se:32,4096+log0.5"
    assert Method.parse("se:16,256+log.5").config == SelfExtendConfig(16, 256, log_scale=0.5)
    assert Method.parse(" se:8,2048+log1 ").config == SelfExtendConfig(8, 2048, log_scale=True)
    for bad in ("se:8", "se:8,2048+", "se:8,2048+logx", "se:8,2048+log-1", "se:a,b", "se:8,2048 +log", "ntk"):
        with pytest.raises(ValueError, match=r"unknown method .*se:G,W\[\+log\[STRENGTH\]\]"):
            Method.parse(bad)
