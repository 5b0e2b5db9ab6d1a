"""The G/W policy (``tuning.plan``): chosen settings reach their length; explicit settings are kept."""

from __future__ import annotations

import json

import pytest


def test_chosen_grouping_always_reaches_the_length():
    from selfextend_llm.tuning import choose_config

    for name in ("SmolLM2-135M-Instruct", "some-other-model"):
        for total in (9_000, 16_000, 32_768, 100_000):
            cfg = choose_config(name, 8192, total)
            assert cfg.max_context(8192) >= total
    assert choose_config("some-other-model", 8192, 4_000) is None  # plain inside the window


def test_plan_fixed_grouping_window_is_its_reach_or_the_target():
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import plan

    fixed = plan("m", 8192, group_size=4, neighbor_window=1024)
    assert fixed.config == SelfExtendConfig(4, 1024)
    assert fixed.context_window == (8192 - 1024) * 4 + 1024 and not fixed.adaptive
    assert plan("m", 8192, group_size=4, neighbor_window=1024, target_context=20_000).context_window == 20_000
    assert fixed.config_for(100) == fixed.config  # a fixed grouping is used at every length
    with pytest.raises(ValueError, match="beyond what G=2, W=1024 can reach"):
        plan("m", 8192, group_size=2, neighbor_window=1024, target_context=100_000)
    # W from the rule of thumb when only G is fixed
    assert plan("m", 8192, group_size=4).config.neighbor_window == 1024


def test_plan_adaptive_keeps_an_explicit_window_at_every_length():
    """An explicit ``neighbor_window`` is never replaced, also not by the tuned table per call."""
    from selfextend_llm.tuning import plan, shipped_table

    name = "SmolLM2-135M-Instruct"
    tuned_windows = {e.config.neighbor_window for e in shipped_table(name).entries if e.config is not None}
    chosen = plan(name, 8192, neighbor_window=512)
    assert chosen.adaptive and chosen.context_window == 4 * 8192
    for total in (4_000, 9_000, 20_000, 32_768):
        cfg = chosen.config_for(total)
        assert cfg is None or cfg.neighbor_window == 512, (total, cfg)
        assert cfg is None or cfg.max_context(8192) >= total
    assert 512 not in tuned_windows  # so the check above really excluded the table's windows
    # without an explicit window the tuned table decides
    assert plan(name, 8192).config_for(20_000).neighbor_window in tuned_windows


def test_plan_refuses_unreachable_targets_and_apply_uses_the_rule_of_thumb():
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import plan

    with pytest.raises(ValueError, match="largest group size accepted is 64"):
        plan("m", 8192, target_context=10_000_000)
    fixed = plan(None, 8192, target_context=65_536, adaptive=False)
    assert fixed.config == SelfExtendConfig.for_target(8192, 65_536) and not fixed.adaptive


def test_every_shipped_table_reaches_its_whole_range():
    """No hole: each entry's setting reaches every length it covers, the default's table to 128k."""
    from selfextend_llm.tuning import SHIPPED_DIR, shipped_table

    files = sorted(SHIPPED_DIR.glob("*.json"))
    assert files, "the embedded default ships a table"
    for path in files:
        table = shipped_table(path.stem)
        assert table is not None and table.entries
        for chat, entries in ((False, table.entries), (True, table.chat_entries)):
            low = 1
            for entry in entries:
                for total in range(low, entry.upto + 1, max(1, (entry.upto - low) // 50)):
                    assert table.lookup(total, chat=chat) is entry
                if entry.config is None:
                    assert entry.upto <= table.pretrained_context
                else:
                    assert entry.config.max_context(table.pretrained_context) >= entry.upto, (path.name, entry)
                low = entry.upto + 1
    default = shipped_table("SmolLM2-135M-Instruct")
    assert default.longest >= 131_072 and default.chat_entries[-1].upto == default.entries[-1].upto
    for total in (100, 4_096, 8_000, 8_192, 8_193, 20_000, 40_000, 65_536, 100_000, 131_072):
        for chat in (False, True):
            cfg = default.lookup(total, chat=chat).config
            assert cfg is None or cfg.max_context(8192) >= total
    # inside the trained window chat calls run as raw ones (plain's perplexity); past it they may differ
    assert all(default.lookup(n, chat=True) == default.lookup(n) for n in (100, 4_096, 8_192))


def test_table_refuses_entries_that_cannot_reach_and_bad_files(tmp_path):
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import TableEntry, TableError, TunedTable, read_table

    with pytest.raises(TableError, match="reaches 51200 tokens, short of its entry's 65536"):
        TunedTable("m", 8192, [TableEntry(65_536, SelfExtendConfig(8, 2048))])
    with pytest.raises(TableError, match="past the trained window"):
        TunedTable("m", 8192, [TableEntry(9_000, None)])
    table = TunedTable("m", 8192, [TableEntry(4_096, None), TableEntry(28_000, SelfExtendConfig(6, 4096, True))])
    path = table.save(tmp_path / "m.json")
    again = read_table(path, "m", 8192)
    assert again.entries == table.entries and again.source == f"tuned file {path}"
    with pytest.raises(TableError, match="trained on 8192 tokens, but this one is trained on 4096"):
        read_table(path, "m", 4096)
    with pytest.raises(TableError, match="made for 'm', not 'other'"):
        read_table(path, "other", 8192)
    with pytest.raises(TableError, match="does not exist"):
        read_table(tmp_path / "missing.json", "m", 8192)
    (tmp_path / "old.json").write_text('{"entries": []}')
    with pytest.raises(TableError, match="not a version-1 SelfExtend table"):
        read_table(tmp_path / "old.json", "m", 8192)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TableError, match="not readable JSON"):
        read_table(tmp_path / "broken.json", "m", 8192)


def test_chat_entries_serve_chat_calls_and_fall_back_to_the_main_entries(tmp_path):
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import SOURCE_SHIPPED, TableEntry, TableError, TunedTable, plan, read_table

    main = [TableEntry(8_192, SelfExtendConfig(2, 4096)), TableEntry(16_384, SelfExtendConfig(6, 256))]
    chat = [TableEntry(8_192, SelfExtendConfig(2, 4096)), TableEntry(12_288, SelfExtendConfig(8, 256))]
    table = TunedTable("m", 8192, main, chat_entries=chat)
    assert table.lookup(10_000).config == SelfExtendConfig(6, 256)
    assert table.lookup(10_000, chat=True).config == SelfExtendConfig(8, 256)
    assert table.lookup(14_000, chat=True).config == SelfExtendConfig(6, 256)  # past the chat entries: the main
    assert table.longest == 16_384
    again = read_table(table.save(tmp_path / "m.json"), "m", 8192)
    assert again.chat_entries == chat and again.entries == main
    assert "chat_entries" not in TunedTable("m", 8192, main).to_json()  # older readers see the same file
    with pytest.raises(TableError, match="reaches 16128 tokens, short of its entry's 20000"):
        TunedTable("m", 8192, main, chat_entries=[TableEntry(20_000, SelfExtendConfig(2, 256))])
    table.source = SOURCE_SHIPPED
    chosen = plan("m", 8192, tuned_table=table)
    assert chosen.config_for(10_000, chat=True) == SelfExtendConfig(8, 256) != chosen.config_for(10_000)
    assert chosen.source_for(10_000, chat=True) == f"{SOURCE_SHIPPED}, chat entry"
    assert chosen.source_for(10_000) == chosen.source_for(14_000, chat=True) == SOURCE_SHIPPED
    # an explicit window is kept for chat calls too: the chat entry of another window is skipped
    assert plan("m", 8192, tuned_table=table, neighbor_window=256).config_for(5_000, chat=True).neighbor_window == 256


def test_sources_tuned_file_beats_shipped_table_beats_rule_of_thumb(tmp_path, monkeypatch):
    """``load()``'s lookup order, and each call's source: own tuned file, shipped table, rule of thumb."""
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import (
        SOURCE_FIXED,
        SOURCE_PLAIN,
        SOURCE_RULE,
        SOURCE_SHIPPED,
        TableEntry,
        TunedTable,
        plan,
        tuned_path,
    )

    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path))
    name = "SmolLM2-135M-Instruct"
    shipped = plan(name, 8192)
    assert shipped.source == SOURCE_SHIPPED and shipped.source_for(20_000) == SOURCE_SHIPPED
    far = plan(name, 8192, target_context=200_000)  # past the table's 128k: the rule of thumb, said so
    assert far.source == f"{SOURCE_SHIPPED}, {SOURCE_RULE} past 131,072 tokens"
    assert far.source_for(150_000) == SOURCE_RULE and far.config_for(150_000).max_context(8192) >= 150_000
    other = plan("some-other-model", 8192)
    assert other.source == SOURCE_RULE and other.source_for(4_000) == SOURCE_PLAIN
    assert plan(name, 8192, group_size=4).source == SOURCE_FIXED
    assert plan(name, 8192, tuned_table=False).source == SOURCE_RULE

    own = TunedTable(name, 8192, [TableEntry(40_000, SelfExtendConfig(10, 1024, True))])
    path = own.save(tuned_path(name))
    found = plan(name, 8192)
    assert found.source == f"tuned file {path}"
    assert found.config_for(9_000) == SelfExtendConfig(10, 1024, True)
    explicit = plan("any-name", 8192, tuned_table=path)  # a path passed in is used for that model
    assert explicit.config_for(30_000) == SelfExtendConfig(10, 1024, True)
    assert plan(name, 8192, tuned_table=True).source == f"tuned file {path}"  # True: look it up, as None
    with pytest.raises(TypeError, match="tuned_table must be a path"):
        plan(name, 8192, tuned_table=3)
    path.write_text("{")  # a broken own file is an error that says what to do, not a silent fallback
    with pytest.raises(ValueError, match="re-create it with tune"):
        plan(name, 8192)


def test_tables_keep_log_strengths_and_refuse_bad_ones(tmp_path):
    """A strength survives the file; strengths 0 and 1 are written as false/true (as older tables say them),
    and a table with a strength no setting accepts is refused as malformed, naming the file."""
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import TableEntry, TableError, TunedTable, read_table

    entries = [
        TableEntry(16_000, SelfExtendConfig(4, 512)),
        TableEntry(28_000, SelfExtendConfig(6, 4096, log_scale=True)),
        TableEntry(60_000, SelfExtendConfig(16, 256, log_scale=0.5)),
    ]
    path = TunedTable("m", 8192, entries).save(tmp_path / "m.json")
    data = json.loads(path.read_text())
    assert [e["log_scale"] for e in data["entries"]] == [False, True, 0.5]
    again = read_table(path, "m", 8192)
    assert again.entries == entries and again.lookup(50_000).config.log_scale == 0.5
    for bad in (-1, "half", None):
        data["entries"][2]["log_scale"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(TableError, match=f"{path}.*malformed table.*log_scale"):
            read_table(path, "m", 8192)


def test_plan_takes_a_log_strength_with_a_fixed_grouping_only():
    from selfextend_llm.config import SelfExtendConfig
    from selfextend_llm.tuning import plan

    fixed = plan("m", 8192, group_size=4, neighbor_window=512, log_scale=0.5)
    assert fixed.config == SelfExtendConfig(4, 512, log_scale=0.5) and fixed.config_for(20_000) == fixed.config
    with pytest.raises(ValueError, match="log_scale=0.5 fixes the strength .* pass group_size"):
        plan("m", 8192, log_scale=0.5)
    with pytest.raises(ValueError, match=r"inside the SelfExtendConfig \(SelfExtendConfig\(G, W, log_scale"):
        plan("m", 8192, config=SelfExtendConfig(4, 512), log_scale=0.5)
