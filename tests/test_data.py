"""oaif.data on real files written to tmp_path, the shared HH test split and the shipped prompt files."""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from oaif.data.hh import load_hh_pairs, parse_hh_dialogue
from oaif.data.preferences import load_preferences, save_preferences
from oaif.data.prompts import load_prompts
from oaif.data.records import PreferenceRecord, PromptRecord
from oaif.data.split import filter_long, split_eval, training_prompts
from oaif.data.stream import PromptStream
from oaif.errors import DataError

REPO = Path(__file__).resolve().parents[1]
HH_FILE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- records ----------------------------------------------------------------------------------
def test_prompt_record_text_and_validation():
    assert PromptRecord("a", "  plain  ").text == "  plain  "
    rec = PromptRecord("b", CHAT)
    assert isinstance(rec.prompt, list)
    assert rec.text == "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Name a colour."
    assert rec.text.endswith("User: Name a colour.")
    with pytest.raises(DataError, match="content"):
        PromptRecord("c", [{"role": "user", "content": 3}])
    with pytest.raises(DataError, match="role"):
        PromptRecord("c", [{"content": "x"}])
    with pytest.raises(DataError, match="int"):
        PromptRecord("c", 5)
    with pytest.raises(DataError, match="probability"):
        PreferenceRecord("p", "q", "a", "b", prob=1.5)


# -- formats ----------------------------------------------------------------------------------
ROWS = [
    {"id": "t1", "prompt": "Write a haiku."},
    {"id": "t2", "prompt": "   "},
    {"id": "t3", "prompt": "Explain DPO."},
    {"id": "t4", "prompt": ""},
]


def check_text_rows(ps, rows_read=4):
    assert [r.id for r in ps.records] == ["t1", "t3"]
    assert [r.prompt for r in ps.records] == ["Write a haiku.", "Explain DPO."]
    assert ps.skipped == {"empty": 2}
    assert ps.rows == rows_read


def test_jsonl_text_and_empty(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    check_text_rows(load_prompts(path))
    check_text_rows(load_prompts(path, format="jsonl"))


def test_jsonl_gz_messages_and_index_ids(tmp_path):
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in [{"messages": CHAT}, {"messages": []}, {"messages": [{"role": "user", "content": " "}]},
                    {"messages": "text too"}]:
            f.write(json.dumps(row) + "\n")
    ps = load_prompts(path, field="messages")
    assert [r.id for r in ps.records] == ["0", "3"]  # row index when there is no id column
    assert ps.records[0].prompt == CHAT
    assert ps.records[1].prompt == "text too"
    assert ps.skipped == {"empty": 2}


def test_csv_text_and_json_messages(tmp_path):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        for r in ROWS:
            w.writerow([r["id"], r["prompt"]])
        w.writerow(["t5", json.dumps(CHAT)])
        w.writerow(["t6", "[not json, just brackets]"])
    ps = load_prompts(path)
    assert [r.id for r in ps.records] == ["t1", "t3", "t5", "t6"]
    assert ps.records[2].prompt == CHAT
    assert ps.records[3].prompt == "[not json, just brackets]"
    assert ps.skipped == {"empty": 2}
    assert ps.rows == 6


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "p.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    check_text_rows(load_prompts(path))
    chat_path = tmp_path / "chat.parquet"
    pd.DataFrame({"prompt": [CHAT, [{"role": "user", "content": "Only turn"}]]}).to_parquet(chat_path)
    ps = load_prompts(chat_path)
    assert [r.id for r in ps.records] == ["0", "1"]
    assert ps.records[0].prompt == CHAT
    assert ps.records[1].text == "User: Only turn"


def test_hf_disk_dataset_and_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    check_text_rows(load_prompts(d))  # auto-detected from dataset_info.json
    check_text_rows(load_prompts(d, format="hf_disk"))

    chat = datasets.Dataset.from_list([{"prompt": CHAT}, {"prompt": [{"role": "user", "content": "Yo"}]}])
    dd = tmp_path / "dd"
    datasets.DatasetDict({"test": chat.select([1]), "train": chat}).save_to_disk(str(dd))
    ps = load_prompts(dd)
    assert [r.prompt for r in ps.records] == [CHAT, [{"role": "user", "content": "Yo"}]]
    only = tmp_path / "only"
    datasets.DatasetDict({"validation": chat.select([1])}).save_to_disk(str(only))
    assert [r.text for r in load_prompts(only).records] == ["User: Yo"]
    two = tmp_path / "two"
    datasets.DatasetDict({"a": chat, "b": chat}).save_to_disk(str(two))
    with pytest.raises(DataError, match="no 'train' split"):
        load_prompts(two)


# -- errors -----------------------------------------------------------------------------------
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_prompts(tmp_path / "nope.jsonl")
    assert one_line(e) == f"prompt file not found: {tmp_path / 'nope.jsonl'}"


def test_bad_json_names_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "fine"}\n{"prompt": broken}\n')
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert "line 4" in one_line(e) and "not valid JSON" in one_line(e)


def test_missing_field_names_columns(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"id": "1", "text": "hi", "source": "x"}])
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert one_line(e) == f"{path} line 1: no field 'prompt' (fields: id, text, source)"
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,question\n1,hi\n")
    with pytest.raises(DataError) as e:
        load_prompts(csv_path)
    assert one_line(e) == f"{csv_path}: no column 'prompt' (columns: id, question)"
    assert len(load_prompts(csv_path, field="question")) == 1


def test_unknown_format_and_extension(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("hello\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        load_prompts(txt)
    with pytest.raises(DataError, match="unknown data format 'xml'"):
        load_prompts(txt, format="xml")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        load_prompts(tmp_path / "plain_dir")


def test_bad_prompt_value_and_duplicate_id(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"prompt": {"role": "user"}}])
    with pytest.raises(DataError, match=r"line 2: field 'prompt': expected text or a list of chat messages, got dict"):
        load_prompts(path)
    dup = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}])
    with pytest.raises(DataError, match="duplicate id '7'"):
        load_prompts(dup)


# -- filtering and splitting --------------------------------------------------------------------
def test_filter_long_counts():
    recs = [PromptRecord(str(i), "word " * n) for i, n in enumerate([1, 5, 3, 9, 4])]
    skipped = Counter({"empty": 2})
    kept, n = filter_long(recs, lambda r: len(r.prompt.split()), 4, skipped=skipped)
    assert [r.id for r in kept] == ["0", "2", "4"]
    assert n == 2
    assert skipped == {"empty": 2, "too_long": 2}


def test_split_eval_deterministic_disjoint():
    recs = [PromptRecord(str(i), f"p{i}") for i in range(50)]
    train, ev = split_eval(recs, 0.2, seed=3)
    assert len(ev) == 10 and len(train) == 40
    assert {r.id for r in train}.isdisjoint({r.id for r in ev})
    assert {r.id for r in train} | {r.id for r in ev} == {r.id for r in recs}
    assert [int(r.id) for r in train] == sorted(int(r.id) for r in train)  # input order kept
    again = split_eval(recs, 0.2, seed=3)
    assert (train, ev) == again
    assert split_eval(recs, 0.2, seed=4)[1] != ev
    assert split_eval(recs, 0.0, seed=3) == (recs, [])
    assert [len(x) for x in split_eval(recs[:2], 0.01, seed=0)] == [1, 1]


def data_cfg(**kw):
    from oaif.config import DataConfig

    return DataConfig(**kw)


def words(prompt) -> list[int]:
    """A stand-in tokenizer: one id per word of the prompt's text."""
    text = prompt if isinstance(prompt, str) else " ".join(m["content"] for m in prompt)
    return list(range(len(text.split())))


def test_training_prompts_filters_then_splits(tmp_path):
    rows = [{"id": f"r{i}", "prompt": "word " * (i % 7 + 1)} for i in range(40)] + [{"id": "empty", "prompt": " "}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    split = training_prompts(data_cfg(path=str(path), max_prompt_tokens=5, eval_fraction=0.25), "online", 3, words)
    kept = [PromptRecord(r["id"], r["prompt"]) for r in rows[:40] if len(r["prompt"].split()) <= 5]
    assert split.skipped == {"empty": 1, "too_long": 40 - len(kept)} and split.usable == len(kept)
    assert (split.train, split.held_out) == tuple(split_eval(kept, 0.25, 3))  # the split is of usable prompts
    assert split.prompt_tokens == {r.id: words(r.prompt) for r in split.train}
    assert training_prompts(data_cfg(path=str(path), max_prompt_tokens=5, eval_fraction=0.25), "online", 4,
                            words).held_out != split.held_out

    evals = write_jsonl(tmp_path / "e.jsonl", [{"id": "e0", "prompt": "held out"}])
    with_file = training_prompts(data_cfg(path=str(path), max_prompt_tokens=5, eval_path=str(evals),
                                          eval_fraction=0.25), "online", 3, words)
    assert with_file.train == kept and [r.id for r in with_file.held_out] == ["e0"]
    with pytest.raises(DataError, match=r"no usable records in .*p.jsonl \(skipped: .*'too_long': 40"):
        training_prompts(data_cfg(path=str(path), max_prompt_tokens=1), "online", 3, lambda p: [0, 0])


def test_training_prompts_offline_filters_preferences_by_prompt_length(tmp_path):
    rows = [{"prompt": "short one", "chosen": "a", "rejected": "b"},
            {"prompt": "a prompt that is far too long", "chosen": "a", "rejected": "b"},
            {"prompt": "same", "chosen": "x", "rejected": "x"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    split = training_prompts(data_cfg(preference_path=str(path), max_prompt_tokens=3, eval_fraction=0.5),
                             "offline", 0, words)
    assert [r.id for r in split.train] == ["0"] and split.held_out == []
    assert split.skipped == {"too_long": 1, "identical": 1}


# -- the stream -------------------------------------------------------------------------------
RECS = [PromptRecord(f"r{i}", f"prompt {i}") for i in range(7)]


def test_stream_epochs_and_determinism():
    s = PromptStream(RECS, seed=11)
    got = s.take(21)
    assert [p for p, _ in got] == list(range(21))
    assert s.position == 21
    epochs = [[r.id for _, r in got[i:i + 7]] for i in (0, 7, 14)]
    for ids in epochs:  # each epoch is a permutation of all records
        assert sorted(ids) == sorted(r.id for r in RECS)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    assert [r.id for _, r in PromptStream(RECS, seed=11).take(21)] == [r.id for _, r in got]
    assert [r.id for _, r in PromptStream(RECS, seed=12).take(21)] != [r.id for _, r in got]
    plain = PromptStream(RECS, seed=11, shuffle=False)
    assert [r.id for _, r in plain.take(9)] == [f"r{i}" for i in range(7)] + ["r0", "r1"]


def test_stream_resume_matches_uninterrupted():
    full = PromptStream(RECS, seed=5)
    expected = full.take(30)

    first = PromptStream(RECS, seed=5)
    head = first.take(4) + first.take(9)
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    assert state["position"] == 13

    resumed = PromptStream(RECS, seed=5)
    resumed.load_state_dict(state)
    tail = resumed.take(17)
    assert head + tail == expected
    with pytest.raises(DataError, match="seed"):
        PromptStream(RECS, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="num_records"):
        PromptStream(RECS[:-1], seed=5).load_state_dict(state)


@pytest.mark.parametrize("n_global,world", [(8, 2), (9, 2), (12, 3)])
def test_take_for_rank_slices(n_global, world):
    single = PromptStream(RECS, seed=2)
    ranks = [PromptStream(RECS, seed=2) for _ in range(world)]
    for _ in range(3):
        want = single.take(n_global)
        parts = [s.take_for_rank(n_global, rank, world) for rank, s in enumerate(ranks)]
        assert [x for part in parts for x in part] == want
        assert all(s.position == single.position for s in ranks)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


# -- preferences ------------------------------------------------------------------------------
def test_load_preferences_and_skips(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "prob": 0.9},
        {"id": "x", "prompt": CHAT, "chosen": "A", "rejected": "B", "probability": 1},
        {"prompt": "Q3", "chosen": "A", "rejected": "B"},
        {"prompt": "Q4", "chosen": "  ", "rejected": "B"},
        {"prompt": "Q5", "chosen": "same", "rejected": "same"},
        {"prompt": "", "chosen": "A", "rejected": "B"},
    ])
    ps = load_preferences(path)
    assert [(r.id, r.prob) for r in ps.records] == [("0", 0.9), ("x", 1.0), ("2", None)]
    assert ps.records[1].prompt == CHAT
    assert ps.skipped == {"empty_response": 1, "identical": 1, "empty_prompt": 1}
    assert ps.rows == 6


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.7", True, [0.5]])
def test_preference_prob_validation_names_line(tmp_path, bad):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"},
                                                   {"prompt": "Q", "chosen": "a", "rejected": "b", "prob": bad}])
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert "line 2" in one_line(e) and "'prob'" in one_line(e)


def test_preference_errors(tmp_path):
    with pytest.raises(DataError, match="preference file not found"):
        load_preferences(tmp_path / "none.jsonl")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"line 1: no field 'rejected' \(fields: prompt, chosen\)"):
        load_preferences(path)
    both = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "prob": 1,
                                               "probability": 1}])
    with pytest.raises(DataError, match="not both"):
        load_preferences(both)


@pytest.mark.parametrize("rows,dup,first,second", [
    # the same explicit id twice
    ([{"id": "a", "prompt": "Q1", "chosen": "x", "rejected": "y"},
      {"id": "a", "prompt": "Q2", "chosen": "x", "rejected": "y"}], "a", 1, 2),
    # an explicit id equal to a later row's default id (its 0-based index)
    ([{"id": "2", "prompt": "Q1", "chosen": "x", "rejected": "y"},
      {"prompt": "Q2", "chosen": "x", "rejected": "y"},
      {"prompt": "Q3", "chosen": "x", "rejected": "y"}], "2", 1, 3),
    # a skipped row still holds its id
    ([{"id": "s", "prompt": "Q1", "chosen": "same", "rejected": "same"},
      {"id": "s", "prompt": "Q2", "chosen": "x", "rejected": "y"}], "s", 1, 2),
])
def test_preference_ids_must_be_unique_so_pairs_find_their_own_prompt(tmp_path, rows, dup, first, second):
    """Offline pairs look their prompt tokens up by record id: a repeated id would train a pair on
    another record's prompt, so the file is refused, naming the id and both lines."""
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_preferences(path)
    assert f"line {second}: duplicate id '{dup}' (first at line {first})" in one_line(e)
    with pytest.raises(DataError, match="duplicate id"):
        training_prompts(data_cfg(preference_path=str(path), eval_fraction=0.0), "offline", 0, words)


@pytest.mark.parametrize("name", ["out/prefs.jsonl", "prefs.jsonl.gz"])
def test_save_preferences_roundtrip(tmp_path, name):
    recs = [PreferenceRecord("a", "Q?", "yes", "no", 0.75), PreferenceRecord("b", CHAT, "Red.", "Blue?", None)]
    path = tmp_path / name
    assert save_preferences(path, recs) == 2
    back = load_preferences(path)
    assert back.records == recs and not back.skipped
    assert not list(path.parent.glob("*.tmp"))


# -- Anthropic HH -----------------------------------------------------------------------------
def test_parse_hh_dialogue_by_hand():
    text = ("\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water.\n\n"
            "Human: For how long?\n\nAssistant:  About nine minutes for hard-boiled.  ")
    context, response = parse_hh_dialogue(text)
    assert context == [{"role": "user", "content": "How do I boil an egg?"},
                       {"role": "assistant", "content": "Put it in boiling water."},
                       {"role": "user", "content": "For how long?"}]
    assert response == "About nine minutes for hard-boiled."
    assert parse_hh_dialogue("Human: hi\n\nAssistant:") == ([{"role": "user", "content": "hi"}], "")
    with pytest.raises(DataError, match="does not end with an Assistant turn"):
        parse_hh_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye")
    with pytest.raises(DataError, match="no 'Human:'"):
        parse_hh_dialogue("just text")


def test_load_hh_pairs_hand_written(tmp_path):
    ctx = "\n\nHuman: Tell me a joke.\n\nAssistant:"
    path = tmp_path / "hh.jsonl"
    write_jsonl(path, [
        {"chosen": ctx + " Why did the chicken cross the road?", "rejected": ctx + " No."},
        {"chosen": ctx + " A", "rejected": "\n\nHuman: Something else.\n\nAssistant: B"},
        {"chosen": ctx + " same", "rejected": ctx + " same"},
        {"chosen": "no turns", "rejected": ctx + " B"},
    ])
    ps = load_hh_pairs(path)
    assert ps.rows == 4
    assert ps.records == [PreferenceRecord("0", [{"role": "user", "content": "Tell me a joke."}],
                                           "Why did the chicken cross the road?", "No.", None)]
    assert ps.skipped == {"context_mismatch": 1, "identical": 1, "unparseable": 1}


@pytest.mark.skipif(not HH_FILE.is_file(), reason="shared HH test split not available")
def test_load_hh_pairs_real_file():
    ps = load_hh_pairs(HH_FILE)
    assert ps.rows == 2312
    assert len(ps.records) > 2000
    assert len(ps.records) + sum(ps.skipped.values()) == 2312
    first = ps.records[0]
    assert first.prob is None
    assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.prompt[-1]["role"] == "user"
    assert first.chosen.startswith("No, sorry!") and first.chosen != first.rejected
    assert all(r.prompt and r.prompt[-1]["role"] == "user" for r in ps.records)


# -- shipped files ----------------------------------------------------------------------------
def test_shipped_demo_prompts():
    ps = load_prompts(REPO / "data" / "prompts" / "demo_prompts.jsonl")
    assert len(ps.records) > 100
    assert not ps.skipped
    assert all(isinstance(r.prompt, str) and 0 < len(r.prompt) <= 600 for r in ps.records)
    assert ps.records[0].id == "user_oriented_task_0"
    assert len({r.id for r in ps.records}) == len(ps.records)


def test_shipped_hh_prompts():
    ps = load_prompts(REPO / "data" / "prompts" / "hh_harmless_prompts.jsonl")
    assert len(ps.records) == 200
    assert all(isinstance(r.prompt, list) and r.prompt[-1]["role"] == "user" for r in ps.records)
