"""Task families and their held-out split: prompts of the asked length, disjoint material between splits,
a search that never ranks on the held-out split, and a table that advertises only what it measured."""

from __future__ import annotations

import dataclasses
import json

import pytest

from selfextend_llm.config import SelfExtendConfig
from selfextend_llm.tasks import families as F
from selfextend_llm.tuning import QUALITY_BAR, TableEntry, TunedTable


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


@pytest.mark.parametrize("split", F.SPLITS)
@pytest.mark.parametrize("family", F.family_names())
def test_every_family_fills_the_asked_length_and_hides_its_answer(default_model, family, split):
    n, count, wrap = 3000, default_model.count_tokens, default_model.with_instruction
    prompt, expected = F.make_prompt(family, split, n, 0.3, 7, count, wrap)
    assert 0.97 * n <= default_model.count_tokens(prompt) <= n  # never more: a candidate must reach the prompt
    text = _text(prompt)
    assert text.count(expected) == 1 and expected.isdigit()
    assert isinstance(prompt, list) == family.endswith("-chat")
    if family.endswith("-chat"):
        assert prompt[0]["role"] == "system" and prompt[0]["content"] == F.INSTRUCTIONS[split][0]
    else:
        assert text.startswith(F.INTROS[split][0])
    if "-keys" in family:  # distractors of the same wording, each with its own value
        assert sum(text.count(name) for name in F.KEY_NAMES[split]) >= F.N_KEYS
    assert F.make_prompt(family, split, n, 0.3, 7, count, wrap) == (prompt, expected)  # seeded
    assert F.make_prompt(family, split, n, 0.3, 8, count, wrap)[1] != expected


def test_the_splits_share_no_wording_filler_passage_instruction_or_key_name(default_model):
    select, held = ({*F.prose_passages(s)} for s in F.SPLITS)
    assert select and held and not select & held
    for table in (F.SINGLE, F.MULTI, F.FILLERS, F.INTROS, F.INSTRUCTIONS, F.KEY_NAMES):
        assert not set(table["select"]) & set(table["heldout"])
    prompt, _ = F.make_prompt("filler-keys", "heldout", 2000, 0.5, 1, default_model.count_tokens)
    for w in F.MULTI["select"] + F.SINGLE["select"]:
        assert w.question.split("{")[0] not in prompt
    assert not any(f.strip() in prompt for f in F.FILLERS["select"])
    assert not any(f" {name} " in prompt for name in F.KEY_NAMES["select"])


def test_prompts_the_model_has_no_system_role_for_take_the_instruction_in_the_user_turn(default_model, monkeypatch):
    monkeypatch.setitem(default_model.__dict__, "supports_system_role", False)  # as Gemma's templates
    (turn,), _ = F.make_prompt(
        "prose-key-chat", "heldout", 1500, 0.5, 0, default_model.count_tokens, default_model.with_instruction
    )
    assert turn["role"] == "user" and turn["content"].startswith(F.INSTRUCTIONS["heldout"][0] + "\n\n")


def test_bad_family_split_depth_or_length_is_refused_with_what_to_use(default_model):
    count = default_model.count_tokens
    with pytest.raises(ValueError, match="unknown task family 'prose-needle'.*filler-key"):
        F.make_prompt("prose-needle", "select", 1000, 0.5, 0, count)
    with pytest.raises(ValueError, match=r"split must be one of \('select', 'heldout'\)"):
        F.make_prompt("prose-key", "validation", 1000, 0.5, 0, count)
    with pytest.raises(ValueError, match="depth must be within 0..1"):
        F.make_prompt("prose-key", "select", 1000, 1.5, 0, count)
    with pytest.raises(ValueError, match="cannot hold a filler-keys prompt"):
        F.make_prompt("filler-keys", "select", 40, 0.5, 0, count)
    with pytest.raises(ValueError, match="needs with_instruction"):
        F.make_prompt("filler-key-chat", "select", 1000, 0.5, 0, count)
    assert F.retrieval_families(["prose-key", "heldout/filler-key-chat", "prose-keys"]) == [
        "prose-key",
        "heldout/filler-key-chat",
    ]


def _entry(upto, cfg, raw=None, chat=None):
    held = {}
    if raw is not None:
        held |= {"heldout/filler-key": raw, "heldout/prose-key": 1.0, "heldout/prose-keys": 0.1}  # multi-key: not a bar
    if chat is not None:
        held |= {"heldout/filler-key-chat": 1.0, "heldout/prose-key-chat": chat}
    return TableEntry(upto, cfg, held_out=held)


def test_quality_context_is_the_longest_length_validated_at_the_bar_raw_and_chat(tmp_path):
    g = SelfExtendConfig(16, 1024)
    entries = [_entry(8192, None), _entry(16384, g, 1.0, 0.95), _entry(32768, g, 0.9, 1.0), _entry(65536, g, 1.0, 0.5)]
    table = TunedTable("m", 8192, entries)
    assert table.quality()[65536] == {"raw": 1.0, "chat": 0.5}  # the worst one-fact family of each form
    assert table.quality_context() == 32768 and QUALITY_BAR == 0.9  # 64k: chat questions fail there
    assert table.quality_context(bar=0.4) == 65536
    # chat entries of their own: a chat call's quality is its chat entry's
    chat = [dataclasses.replace(e, held_out={**e.held_out, "heldout/prose-key-chat": 1.0}) for e in entries]
    assert TunedTable("m", 8192, entries, chat_entries=chat).quality_context() == 65536
    # a length past the window that was never validated ends the claim where it starts
    gap = [entries[0], _entry(12288, g), *entries[1:]]
    assert TunedTable("m", 8192, gap).quality_context() == 8192
    assert TunedTable("m", 8192, [_entry(8192, None), _entry(16384, g)]).quality_context() is None  # never validated
    # a model without a chat template validates raw only, and is judged on that
    raw_only = TunedTable("m", 8192, [_entry(16384, g, 1.0), _entry(32768, g, 0.95)])
    assert raw_only.quality_context() == 32768
    path = table.save(tmp_path / "t.json")  # held-out scores survive the file
    again = TunedTable.from_json(json.loads(path.read_text()))
    assert again.quality() == table.quality() and again.entries[1].held_out == entries[1].held_out


def _held_out(prompt) -> bool:
    text = _text(prompt)
    return text.startswith(F.INTROS["heldout"][0]) or F.INSTRUCTIONS["heldout"][0] in text


def test_the_search_ranks_on_the_selection_split_only_and_the_table_advertises_the_held_out_one(
    tiny_folder, tmp_path, monkeypatch
):
    """Answers are scripted: the selection split is answered only under G4 W32 (so it must win), the held-out
    split under everything else.  The choice cannot move with the held-out outcome, the baselines are measured
    there, and the table claims quality only where the held-out split reached the bar."""
    import selfextend_llm
    from selfextend_llm import search
    from selfextend_llm.hf import apply as hf_apply

    monkeypatch.setenv("SELFEXTEND_LLM_CACHE", str(tmp_path / "cache"))
    se = selfextend_llm.load(str(tiny_folder), device="cpu")
    winner, other = SelfExtendConfig(4, 32), SelfExtendConfig(8, 16)
    held_out_right = {"flag": False}

    def scripted(se, prompts, max_new_tokens):
        cfg = hf_apply.settings_of(se.model).config if hf_apply.is_applied(se.model) else None
        right = [held_out_right["flag"] if _held_out(p) else cfg == winner for p in prompts]
        return [_text(p) if ok else "no idea" for p, ok in zip(prompts, right, strict=True)]  # the prompt holds it

    monkeypatch.setattr(search, "generate_raw", scripted)
    kw = dict(depths=1, prompts=1, keep=1, baselines=["yarn"], settings=[other, winner], progress=False, validate=1)
    table, (result,) = search.tune(se, [300], **kw)
    assert result.best == result.best_chat == "se:4,32"
    twins = {f"heldout/{f}" for f in F.family_names()}
    assert set(result.held_out("se:4,32")) == twins and set(result.held_out("yarn")) == twins
    assert result.held_out("se:8,16") == {}  # not chosen: not validated
    assert set(result.accuracy["yarn"]) == twins  # baselines run on the held-out split only
    assert table.quality() == {300: {"raw": 0.0, "chat": 0.0}} and table.quality_context() == 128
    assert table.measured["held_out"] == sorted(twins, key=[f"heldout/{f}" for f in F.family_names()].index)

    held_out_right["flag"] = True
    table, (again,) = search.tune(se, [300], **kw)
    assert again.best == result.best and again.worst("se:4,32") == result.worst("se:4,32") == 1.0
    assert table.quality_context() == 300 and table.entries[0].held_out["heldout/prose-key"] == 1.0

    path = table.save(tmp_path / "cache" / "tuned" / "tiny-llama.json")
    tuned = selfextend_llm.load(str(tiny_folder), device="cpu", target_context=512)
    info = tuned.describe()
    assert tuned.quality_context == info["quality_context"] == 300 and info["context_window"] == 512
    assert info["quality"]["measured"] == {300: {"raw": 1.0, "chat": 1.0}} and path.is_file()
    fixed = selfextend_llm.load(str(tiny_folder), device="cpu", group_size=4, neighbor_window=32)
    assert fixed.quality_context is None  # a grouping fixed by the caller was not what the table measured
