"""Tests for rlhf_cli.data: loading local files and converting each format to TRL's dataset formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from rlhf_cli.data import load_data
from rlhf_cli.errors import UserError
from rlhf_cli.recipe import DataSource

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def system(content):
    return {"role": "system", "content": content}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return path


def load(path: Path, kind: str, **fields) -> list[dict]:
    ds = load_data(DataSource(path=str(path), **fields), kind)
    return ds.to_list()


def load_error(path: Path, kind: str, **fields) -> str:
    with pytest.raises(UserError) as info:
        load_data(DataSource(path=str(path), **fields), kind)
    return str(info.value)


# ---------------------------------------------------------------- TRL-native formats


def test_text(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world", "id": 1}, {"text": "second", "id": 2}])
    assert load(path, "sft") == [{"text": "hello world"}, {"text": "second"}]
    assert load(path, "sft", format="text") == [{"text": "hello world"}, {"text": "second"}]


def test_prompt_completion_text(tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "2+2=", "completion": " 4", "source": "math"}])
    assert load(path, "sft") == [{"prompt": "2+2=", "completion": " 4"}]


def test_prompt_completion_conversational(tmp_path):
    rows = [{"prompt": [system("Be brief."), user("Hi")], "completion": [assistant("Hello.")]}]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    assert load(path, "sft", format="prompt_completion") == rows


def test_messages_keep_only_role_and_content(tmp_path):
    rows = [
        {"messages": [user("Hi"), {"role": "assistant", "content": "Hello", "name": "bot"}], "lang": "en"},
        {"messages": [system(""), user("Q"), assistant("A"), {"role": "tool", "content": "42"}], "lang": "en"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    assert load(path, "sft") == [
        {"messages": [user("Hi"), assistant("Hello")]},
        {"messages": [system(""), user("Q"), assistant("A"), {"role": "tool", "content": "42"}]},
    ]


def test_preference_explicit_prompt(tmp_path):
    rows = [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green.", "score": 3}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load(path, "preference") == [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."}]


def test_preference_conversational_explicit_prompt(tmp_path):
    rows = [{"prompt": [user("Sky?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Green.")]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load(path, "preference", format="preference") == rows


def test_preference_implicit_prompt_passes_through(tmp_path):
    rows = [{"chosen": [user("Sky?"), assistant("Blue.")], "rejected": [user("Sky?"), assistant("Green.")]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert load(path, "preference") == rows


# ---------------------------------------------------------------- alpaca, sharegpt, hh


def test_alpaca_sft(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {
            "instruction": "And now?",
            "input": "",
            "output": "Bye.",
            "system": "You are terse.",
            "history": [["Hello", "Hi."], ["How are you?", "Fine."]],
        },
    ]
    path = write_json(tmp_path / "alpaca.json", rows)
    assert load(path, "sft") == [
        {"prompt": [user("Add the numbers.\n\n2 and 3")], "completion": [assistant("5")]},
        {"prompt": [user("Say hi.")], "completion": [assistant("Hi!")]},
        {
            "prompt": [
                system("You are terse."),
                user("Hello"),
                assistant("Hi."),
                user("How are you?"),
                assistant("Fine."),
                user("And now?"),
            ],
            "completion": [assistant("Bye.")],
        },
    ]


def test_alpaca_preference(tmp_path):
    rows = [{"instruction": "Name a color.", "input": "warm", "chosen": "Red.", "rejected": "Blue."}]
    path = write_json(tmp_path / "alpaca_dpo.json", rows)
    assert load(path, "preference") == [
        {"prompt": [user("Name a color.\n\nwarm")], "chosen": [assistant("Red.")], "rejected": [assistant("Blue.")]}
    ]


def test_sharegpt_sft(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be kind."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "user", "value": "Bye"},
                {"from": "model", "value": "Bye!"},
            ]
        },
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "assistant", "value": "A"}], "system": "Sys"},
    ]
    path = write_json(tmp_path / "sharegpt.json", rows)
    assert load(path, "sft") == [
        {"messages": [system("Be kind."), user("Hi"), assistant("Hello"), user("Bye"), assistant("Bye!")]},
        {"messages": [system("Sys"), user("Q"), assistant("A")]},
    ]


def test_sharegpt_preference(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Joke?"},
            ],
            "chosen": {"from": "gpt", "value": "Knock knock."},
            "rejected": {"from": "gpt", "value": "No."},
        }
    ]
    path = write_json(tmp_path / "dpo.json", rows)
    assert load(path, "preference") == [
        {
            "prompt": [user("Hi"), assistant("Hello"), user("Joke?")],
            "chosen": [assistant("Knock knock.")],
            "rejected": [assistant("No.")],
        }
    ]


HH_ROWS = [
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Good, thanks.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Go away.",
    },
    {
        "chosen": "\n\nHuman: Help me\n\nAssistant:",
        "rejected": "\n\nHuman: Help me\n\nAssistant: No.  Human: please\n\nAssistant:  Still no.",
    },
]


def test_hh_preference(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    assert load(path, "preference") == [
        {
            "prompt": [user("Hi"), assistant("Hello!"), user("How are you?")],
            "chosen": [assistant("Good, thanks.")],
            "rejected": [assistant("Go away.")],
        },
        {
            "prompt": [user("Help me")],
            "chosen": [assistant("")],
            "rejected": [assistant("No.  Human: please"), assistant(" Still no.")],
        },
    ]


def test_hh_sft_uses_chosen(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS[:1])
    assert load(path, "sft") == [
        {"messages": [user("Hi"), assistant("Hello!"), user("How are you?"), assistant("Good, thanks.")]}
    ]


# ---------------------------------------------------------------- file types, mapping, limit


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text('instruction,input,output\nWhat is 6*7?,,42\n"Say ""hi""",loudly,HI\n', encoding="utf-8")
    assert load(path, "sft") == [
        {"prompt": [user("What is 6*7?")], "completion": [assistant("42")]},
        {"prompt": [user('Say "hi"\n\nloudly')], "completion": [assistant("HI")]},
    ]


def test_parquet(tmp_path):
    import datasets

    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_list([{"prompt": "P", "chosen": "C", "rejected": "R", "extra": 1}]).to_parquet(str(path))
    assert load(path, "preference") == [{"prompt": "P", "chosen": "C", "rejected": "R"}]


def test_json_lines_in_dot_json_and_gzip(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    plain = write_jsonl(tmp_path / "lines.json", rows)
    packed = tmp_path / "lines.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write(plain.read_text(encoding="utf-8"))
    assert load(plain, "sft") == rows
    assert load(packed, "sft") == rows


def test_column_mapping(tmp_path):
    rows = [{"question": "Q1", "answer": "A1", "prompt": "ignored"}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    assert load(path, "sft", columns={"prompt": "question", "completion": "answer"}) == [
        {"prompt": "Q1", "completion": "A1"}
    ]


def test_column_mapping_swap(tmp_path):
    path = write_jsonl(tmp_path / "swap.jsonl", [{"chosen": "bad", "rejected": "good", "prompt": "P"}])
    assert load(path, "preference", columns={"chosen": "rejected", "rejected": "chosen"}) == [
        {"prompt": "P", "chosen": "good", "rejected": "bad"}
    ]


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(10)])
    assert load(path, "sft", limit=3) == [{"text": "row 0"}, {"text": "row 1"}, {"text": "row 2"}]
    assert len(load(path, "sft", limit=50)) == 10


def test_directory_of_files(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_jsonl(folder / "part-0.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(folder / "part-1.jsonl", [{"text": "c"}])
    (folder / "LICENSE").write_text("not data", encoding="utf-8")
    assert load(folder, "sft") == [{"text": "a"}, {"text": "b"}, {"text": "c"}]


@pytest.mark.parametrize(
    ("row", "kind", "columns"),
    [
        ({"messages": [user("a")], "text": "x"}, "sft", ["messages"]),
        ({"conversations": [{"from": "human", "value": "a"}], "text": "x"}, "sft", ["messages"]),
        ({"instruction": "i", "output": "o", "text": "x"}, "sft", ["prompt", "completion"]),
        ({"prompt": "p", "completion": "c", "text": "x"}, "sft", ["prompt", "completion"]),
        ({"text": "x", "label": 1}, "sft", ["text"]),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "z"}, "sft", ["messages"]),
        (
            {"conversations": [{"from": "human", "value": "a"}], "chosen": {"from": "gpt", "value": "b"},
             "rejected": {"from": "gpt", "value": "c"}},
            "preference",
            ["prompt", "chosen", "rejected"],
        ),
        ({"instruction": "i", "chosen": "b", "rejected": "c"}, "preference", ["prompt", "chosen", "rejected"]),
        (HH_ROWS[0], "preference", ["prompt", "chosen", "rejected"]),
        ({"chosen": "b", "rejected": "c"}, "preference", ["chosen", "rejected"]),
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "preference", ["prompt", "chosen", "rejected"]),
    ],
)
def test_auto_detection(tmp_path, row, kind, columns):
    path = write_jsonl(tmp_path / "auto.jsonl", [row])
    assert list(load(path, kind)[0]) == columns


# ---------------------------------------------------------------- bad inputs


def test_missing_field(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 6 + [{"prompt": "p", "chosen": "c"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    assert load_error(path, "preference") == f"data.train ({path}), row 7: field 'rejected' is missing."


def test_error_names_what(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": ""}])
    with pytest.raises(UserError, match=r"^data\.eval \(.*t\.jsonl\), row 1: field 'text' is empty"):
        load_data(DataSource(path=str(path)), "sft", what="data.eval")


def test_error_late_in_a_large_file_reaches_caller_as_user_error(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(2499)] + [{"text": 7}]
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    message = load_error(path, "sft")
    assert message == f"data.train ({path}), row 2500: field 'text' must be a string, got a number."


@pytest.mark.parametrize(
    ("row", "kind", "fields", "expected"),
    [
        ({"prompt": "p", "completion": "  "}, "sft", {}, "field 'completion' is empty"),
        ({"prompt": "p", "completion": ["c"]}, "sft", {}, "'completion' message 1 must be a mapping"),
        (
            {"prompt": "p", "completion": [assistant("c")]},
            "sft",
            {},
            "fields mix message lists ('completion') and text ('prompt')",
        ),
        ({"messages": [{"role": "bot", "content": "x"}]}, "sft", {}, "'messages' message 1 has unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "sft", {}, "'messages' message 1 needs a string 'content'"),
        ({"messages": []}, "sft", {}, "field 'messages' must be a non-empty list of messages, got an empty list"),
        ({"instruction": "", "output": "o"}, "sft", {}, "field 'instruction' is empty"),
        ({"instruction": "i", "output": "o", "history": [["only one"]]}, "sft", {}, "'history' item 1 must be a"),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
            "sft",
            {},
            "'conversations' turn 2 has unknown role 'bot' (expected human, user, gpt,",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
             "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "d"}},
            "preference",
            {},
            "'conversations' must end with a human turn",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}],
             "chosen": {"from": "human", "value": "c"}, "rejected": {"from": "gpt", "value": "d"}},
            "preference",
            {},
            "field 'chosen' must be a gpt/assistant turn, got one from 'human'",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hello\n\nAssistant: b"},
            "preference",
            {},
            "'chosen' and 'rejected' share no Human turn",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: a"},
            "preference",
            {},
            "'chosen' and 'rejected' are the same transcript",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: x\n\nAssistant: y",
             "rejected": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: z\n\nAssistant: y"},
            "preference",
            {},
            "still share an Assistant turn",
        ),
        ({"chosen": "just text", "rejected": "other"}, "preference", {"format": "hh"}, "must be a transcript"),
        ({"chosen": "c", "rejected": ["r"]}, "preference", {}, "'rejected' message 1 must be a mapping"),
    ],
)
def test_malformed_row(tmp_path, row, kind, fields, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    message = load_error(path, kind, **fields)
    assert message.startswith(f"data.train ({path}), row 1: ")
    assert expected in message


def test_rows_must_agree_on_text_or_messages(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": [user("p")], "chosen": [assistant("c")], "rejected": [assistant("r")]},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    message = load_error(path, "preference")
    assert message == f"data.train ({path}), row 2: field 'prompt' holds messages here but text in row 1."


def test_malformed_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"text": "a"},\n {"text": "b",,}]', encoding="utf-8")
    message = load_error(path, "sft")
    assert message.startswith(f"data.train ({path}) is not valid JSON or JSON lines: line 2, column 15: ")


def test_malformed_json_lines_in_a_directory_names_the_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "b"}\n{"text": \n', encoding="utf-8")
    message = load_error(tmp_path, "sft")
    assert message.startswith(f"data.train ({broken}) is not valid JSON or JSON lines: line 2: ")


def test_directory_mixing_file_kinds(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    (tmp_path / "b.csv").write_text("text\nb\n", encoding="utf-8")
    assert "the directory mixes csv and json files" in load_error(tmp_path, "sft")


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", ""), ("empty.json", "[]"), ("empty.jsonl.gz", None)])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        with gzip.open(path, "wt") as handle:
            handle.write("")
    else:
        path.write_text(content, encoding="utf-8")
    message = load_error(path, "sft")
    assert str(path) in message
    assert "empty" in message or "no rows" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello", encoding="utf-8")
    assert "cannot read this kind of file" in load_error(path, "sft")


@pytest.mark.parametrize(("fmt", "kind"), [("text", "preference"), ("messages", "preference"), ("preference", "sft")])
def test_format_does_not_fit_kind(tmp_path, fmt, kind):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "chosen": "c", "rejected": "r", "messages": [user("x")]}])
    message = load_error(path, kind, format=fmt)
    assert message.startswith(f"data.train ({path}): format '{fmt}' does not fit this stage")


def test_explicit_format_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "i", "chosen": "c"}])
    message = load_error(path, "preference", format="alpaca")
    assert "format 'alpaca' needs the columns instruction+chosen+rejected" in message
    assert "missing: rejected; columns found: [instruction, chosen]" in message


@pytest.mark.parametrize("kind", ["sft", "preference"])
def test_undetectable_columns(tmp_path, kind):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": "1", "b": "2"}])
    message = load_error(path, kind)
    assert message.startswith(f"data.train ({path}): cannot tell the format from columns [a, b]; ")
    assert ("prompt+completion" if kind == "sft" else "chosen+rejected") in message
    assert message.endswith("set data.train.format or data.train.columns.")


def test_mapped_column_absent(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    message = load_error(path, "sft", columns={"prompt": "query", "completion": "answer"})
    assert message == (
        f"data.train ({path}): data.train.columns maps 'prompt' to column 'query', which is not in the data; "
        "columns found: [question, answer]."
    )


def test_two_names_mapped_to_one_column(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "completion": "a"}])
    message = load_error(path, "sft", columns={"prompt": "completion", "completion": "completion"})
    assert "maps several names to the same column" in message


def test_hub_dataset_that_cannot_be_loaded(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Both libraries read HF_HUB_OFFLINE when imported, so the setting must be patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as info:
        load_data(DataSource(name="no-such-user/no-such-dataset-xyz"), "sft")
    message = str(info.value)
    assert message.startswith("data.train: cannot load hub dataset 'no-such-user/no-such-dataset-xyz'")
    assert "set data.train.path to a local" in message


# ---------------------------------------------------------------- the real files in ../shared/data


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared data folder holds the real demo datasets)")
    return path


def test_real_hh_rlhf_pairs():
    rows = load(shared_file("hh-rlhf-harmless/pairs.jsonl.gz"), "preference")
    assert len(rows) == 1800
    for row in rows:
        assert list(row) == ["prompt", "chosen", "rejected"]
        assert row["prompt"][-1]["role"] == "user"
        for key in ("chosen", "rejected"):
            assert row[key] and all(message["role"] == "assistant" for message in row[key])


def test_real_alpaca_demo():
    rows = load(shared_file("llama-factory-demo/alpaca_en_demo.json"), "sft")
    assert len(rows) == 999
    raw = json.loads(shared_file("llama-factory-demo/alpaca_en_demo.json").read_text(encoding="utf-8"))[0]
    expected_user = raw["instruction"] + (f"\n\n{raw['input']}" if raw["input"] else "")
    assert rows[0] == {"prompt": [user(expected_user)], "completion": [assistant(raw["output"])]}


def test_real_dpo_demo():
    rows = load(shared_file("llama-factory-demo/dpo_en_demo.json"), "preference")
    assert len(rows) == 300
    for row in rows:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"]
        assert [m["role"] for m in row["rejected"]] == ["assistant"]


def test_real_identity():
    rows = load(shared_file("llama-factory-demo/identity.json"), "sft", format="alpaca")
    assert len(rows) == 91
    assert rows[0] == {"prompt": [user("hi")], "completion": [assistant(rows[0]["completion"][0]["content"])]}
    assert "{{name}}" in rows[0]["completion"][0]["content"]


def test_prompts_for_rollouts(tmp_path):
    """PPO reads prompts: a prompt column (text or messages), alpaca instructions, or a mapped column."""
    from rlhf_cli.data import load_data
    from rlhf_cli.recipe import DataSource

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}\n')
    assert load_data(DataSource(path=str(path)), "prompt").to_list() == [
        {"prompt": [{"role": "user", "content": "hi"}]}]
    path.write_text('{"instruction": "Add", "input": "1 and 2", "output": "3"}\n')
    assert load_data(DataSource(path=str(path)), "prompt")[0]["prompt"] == [
        {"role": "user", "content": "Add\n\n1 and 2"}]
    path.write_text('{"question": "What is 2+2?", "answer": "#### 4"}\n')
    ds = load_data(DataSource(path=str(path), columns={"prompt": "question"}), "prompt")
    assert ds[0]["prompt"] == "What is 2+2?"
    with pytest.raises(UserError, match="row 1: field 'prompt'"):
        path.write_text('{"prompt": ""}\n')
        load_data(DataSource(path=str(path)), "prompt")
