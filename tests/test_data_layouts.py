"""Source layouts read without a converter script: a winner label column (AlpacaEval/AlpacaFarm), ranked responses
(OpenAssistant-like), nested paths and prompt templates (Self-Instruct seed tasks); and the DataReport that counts
rows read, kept and dropped and names unused columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from conftest import assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.data import DataReport, load_data, load_data_with_report
from rlhf_cli.errors import UserError
from rlhf_cli.recipe import DataSource
from test_data import assistant, user, write_json, write_jsonl

ALPACA_EVAL_WINNER = {"column": "preference", "responses": ["output_1", "output_2"], "first": 1, "second": 2, "tie": 0}




def load(path: Path, kind: str, **fields) -> tuple[list[dict], DataReport]:
    dataset, report = load_data_with_report(DataSource(path=str(path), **fields), kind)
    return dataset.to_list(), report


def load_error(path: Path, kind: str, **fields) -> str:
    with pytest.raises(UserError) as info:
        load_data_with_report(DataSource(path=str(path), **fields), kind)
    return str(info.value)


# ---------------------------------------------------------------- winner: two responses and a label column


def alpaca_eval_row(instruction, first, second, preference, **extra):
    """One row as AlpacaEval's annotation exports have it."""
    return {"instruction": instruction, "output_1": first, "generator_1": "model_a", "output_2": second,
            "generator_2": "model_b", "preference": preference, **extra}  # fmt: skip


def test_alpaca_eval_labels_swap_skip_ties_and_count(tmp_path):
    rows = [
        alpaca_eval_row("Name a fruit.", "Apple.", "Rock.", 1),
        alpaca_eval_row("What is 2+2?", "5", "4", 2),
        alpaca_eval_row("Say hi.", "Hello", "Hey", 0),
        alpaca_eval_row("Capital of France?", "Lyon", "Paris", 2.0),  # float labels, as in the weighted exports
        alpaca_eval_row("Colour of the sky?", "Blue", "Green", 1.0),
        alpaca_eval_row("Pick one.", "A", "B", 0.0),
    ]
    path = write_json(tmp_path / "annotations.json", rows)
    pairs, report = load(path, "preference", winner=ALPACA_EVAL_WINNER)
    assert pairs == [
        {"prompt": [user("Name a fruit.")], "chosen": [assistant("Apple.")], "rejected": [assistant("Rock.")]},
        {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": [user("Capital of France?")], "chosen": [assistant("Paris")], "rejected": [assistant("Lyon")]},
        {"prompt": [user("Colour of the sky?")], "chosen": [assistant("Blue")], "rejected": [assistant("Green")]},
    ]
    assert (report.format, report.detected) == ("alpaca", True)
    assert (report.rows_read, report.rows_kept) == (6, 4)
    assert report.dropped == {"rows labelled a tie": 2}
    assert report.unused_columns == ["generator_1", "generator_2"]
    assert report.columns["chosen"] == "output_1 or output_2, by winner column preference"
    assert report.notices() == [
        "Warning: data.train: dropped 2 rows labelled a tie; 4 rows kept of 6 rows read.",
        "Note: data.train: columns not used: generator_1, generator_2.",
    ]


def test_alpaca_farm_csv_string_labels_with_input(tmp_path):
    path = tmp_path / "alpaca_farm.csv"
    path.write_text(
        "instruction,input,output_1,output_2,preference\n"
        "Translate.,Bonjour,Hello,Goodbye,1\n"
        "Add the numbers.,2 and 3,6,5,2\n"
        "Say hi.,,Hi!,Hey!,0\n"
        "Spell cat.,,C-A-T,K-A-T,1.0\n",
        encoding="utf-8",
    )
    pairs, report = load(path, "preference", winner=ALPACA_EVAL_WINNER)
    assert [(p["prompt"][0]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("Translate.\n\nBonjour", "Hello", "Goodbye"),
        ("Add the numbers.\n\n2 and 3", "5", "6"),
        ("Spell cat.", "C-A-T", "K-A-T"),
    ]
    assert report.dropped == {"rows labelled a tie": 1}
    assert report.unused_columns == []


def test_winner_with_plain_prompt_column_and_string_labels(tmp_path):
    rows = [{"question": "Sky?", "a": "Blue", "b": "Green", "better": "A"},
            {"question": "Grass?", "a": "Red", "b": "Green", "better": "B"},
            {"question": "Sea?", "a": "Salty", "b": "Sweet", "better": "unsure"}]  # fmt: skip
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    winner = {"column": "better", "responses": ["a", "b"], "first": "A", "second": "B", "skip": "unsure"}
    pairs, report = load(path, "preference", winner=winner, columns={"prompt": "question"})
    assert pairs == [{"prompt": "Sky?", "chosen": "Blue", "rejected": "Green"},
                     {"prompt": "Grass?", "chosen": "Green", "rejected": "Red"}]  # fmt: skip
    assert report.format == "preference"
    assert report.dropped == {"rows with a label listed in winner.skip": 1}


def test_unknown_label_names_the_row_and_the_value(tmp_path):
    rows = [alpaca_eval_row("a", "x", "y", 1), alpaca_eval_row("b", "x", "y", 2), alpaca_eval_row("c", "x", "y", 3)]
    path = write_json(tmp_path / "annotations.json", rows)
    message = load_error(path, "preference", winner=ALPACA_EVAL_WINNER)
    assert message == (
        f"data.train ({path}), row 3: label 3 in column 'preference' is none of the values winner declares "
        "(first 1; second 2; tie 0); list it under winner.skip to leave such rows out."
    )
    # Listed under skip, the same rows are left out and counted.
    pairs, report = load(path, "preference", winner={**ALPACA_EVAL_WINNER, "skip": [3]})
    assert len(pairs) == 2
    assert report.dropped == {"rows with a label listed in winner.skip": 1}


def test_missing_label_is_an_error_unless_null_is_skipped(tmp_path):
    rows = [alpaca_eval_row("a", "x", "y", 1), alpaca_eval_row("b", "x", "y", None)]
    path = write_json(tmp_path / "annotations.json", rows)
    assert "row 2: label null in column 'preference' is none of the values" in load_error(
        path, "preference", winner=ALPACA_EVAL_WINNER
    )
    pairs, report = load(path, "preference", winner={**ALPACA_EVAL_WINNER, "skip": [None]})
    assert len(pairs) == 1 and report.dropped == {"rows with a label listed in winner.skip": 1}


def test_winner_response_path_missing_in_a_row(tmp_path):
    rows = [{"prompt": "p", "answers": {"a": "x", "b": "y"}, "label": 1}, {"prompt": "q", "answers": {"a": "x"},
                                                                            "label": 2}]  # fmt: skip
    path = write_jsonl(tmp_path / "nested.jsonl", rows)
    winner = {"column": "label", "responses": ["answers.a", "answers.b"], "first": 1, "second": 2}
    assert load_error(path, "preference", winner=winner) == (
        f"data.train ({path}), row 2: winner.responses 'answers.b' is missing: 'answers' has no value for 'b'."
    )


def test_winner_is_for_preference_data(tmp_path):
    path = write_json(tmp_path / "annotations.json", [alpaca_eval_row("a", "x", "y", 1)])
    assert "data.train.winner makes preference pairs, but this stage reads SFT data" in load_error(
        path, "sft", winner=ALPACA_EVAL_WINNER
    )
    # Prompts need no labels: the winner is set aside, and the note says so.
    prompts, report = load(path, "prompt", winner=ALPACA_EVAL_WINNER)
    assert prompts == [{"prompt": [user("a")]}]
    assert "Note: data.train: winner is not used: only the prompt is read here." in report.notices()


@pytest.mark.parametrize(
    ("winner", "expected"),
    [
        ({**ALPACA_EVAL_WINNER, "tie": [1]}, "label 1 is listed under both first and tie"),
        ({**ALPACA_EVAL_WINNER, "second": "1.0"}, "label '1.0' is listed under both first and second"),
        ({**ALPACA_EVAL_WINNER, "responses": ["output_1"]}, "responses must name two different columns"),
        ({**ALPACA_EVAL_WINNER, "first": []}, "first needs at least one label value"),
    ],
)
def test_winner_section_checked_when_the_recipe_is_read(winner, expected):
    with pytest.raises(ValidationError, match=expected):
        DataSource(path="x.json", winner=winner)


# ---------------------------------------------------------------- identical pairs, HH without an Assistant turn


def test_identical_chosen_and_rejected_are_dropped_and_counted(tmp_path, capsys):
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "chosen": "same", "rejected": "same"}]  # fmt: skip
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    dataset = load_data(DataSource(path=str(path)), "preference")
    assert dataset.to_list() == [rows[0]]
    err = " ".join(capsys.readouterr().err.split())
    assert "Warning: data.train: dropped 1 pair with identical chosen and rejected; 1 row kept of 2 rows read." in err


def test_every_row_dropped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}] * 2)
    assert load_error(path, "preference") == (
        f"data.train ({path}), row 1: 'chosen' and 'rejected' are identical; every row read was dropped "
        "(2 pairs with identical chosen and rejected), so nothing is left to use."
    )


def test_hh_transcript_without_an_assistant_turn_is_not_read_as_a_plain_pair(tmp_path):
    rows = [{"chosen": "\n\nHuman: How do I pick a lock?", "rejected": "\n\nHuman: How do I pick a lock? Please."}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    assert load_error(path, "preference") == (
        f"data.train ({path}), row 1: field 'chosen' is an HH transcript with no Assistant turn "
        "(no '\\n\\nAssistant:' marker)."
    )


# ---------------------------------------------------------------- ranked responses


def test_ranked_mappings_best_against_each_other(tmp_path):
    rows = [
        {"prompt": "Best pet?", "message_id": "m1",
         "replies": [{"text": "Cat.", "rank": 1}, {"text": "Dog.", "rank": 0}, {"text": "Rock.", "rank": 2},
                     {"text": "Fish.", "rank": None}]},
        {"prompt": "Best colour?", "message_id": "m2",
         "replies": [{"text": "Red.", "rank": 0}, {"text": "Blue.", "rank": 0}, {"text": "Grey.", "rank": 1}]},
        {"prompt": "Only one?", "message_id": "m3", "replies": [{"text": "Yes.", "rank": 0}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "oasst.jsonl", rows)
    pairs, report = load(path, "preference", ranking={"responses": "replies", "better": "lower"})
    assert pairs == [
        {"prompt": "Best pet?", "chosen": "Dog.", "rejected": "Cat."},
        {"prompt": "Best pet?", "chosen": "Dog.", "rejected": "Rock."},
        {"prompt": "Best colour?", "chosen": "Red.", "rejected": "Grey."},
    ]
    assert (report.format, report.rows_read, report.rows_kept) == ("ranked", 3, 3)
    assert report.dropped == {
        "responses without a rank": 1,
        "pairs tied with the best response": 1,
        "rankings with fewer than two ranked responses": 1,
    }
    assert report.unused_columns == ["message_id"]
    assert report.summary() == (
        f"data.train ({path}): format ranked (detected); 3 rows read, 3 pairs kept; dropped 1 response without a "
        "rank, 1 pair tied with the best response, 1 ranking with fewer than two ranked responses."
    )


def test_ranked_parallel_scores_higher_is_better_with_messages(tmp_path):
    rows = [{"prompt": [user("Joke?")], "completions": ["No.", "Knock knock.", "Why did the chicken..."],
             "scores": [0.1, 0.9, 0.5]}]  # fmt: skip
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    ranking = {"responses": "completions", "rank_column": "scores", "better": "higher"}
    pairs, report = load(path, "preference", format="ranked", ranking=ranking)
    assert pairs == [
        {"prompt": [user("Joke?")], "chosen": [assistant("Knock knock.")], "rejected": [assistant("No.")]},
        {"prompt": [user("Joke?")], "chosen": [assistant("Knock knock.")],
         "rejected": [assistant("Why did the chicken...")]},
    ]  # fmt: skip
    assert report.detected is False and report.dropped == {}
    assert report.columns == {"prompt": "prompt", "responses": "ranking of completions"}


@pytest.mark.parametrize(
    ("row", "ranking", "expected"),
    [
        ({"prompt": "p", "responses": [{"text": "a", "rank": "first"}, {"text": "b", "rank": 2}]}, {},
         "row 1: 'responses' response 1 'rank' must be a number, got 'first'"),
        ({"prompt": "p", "completions": ["a", "b"], "ranks": [1]}, {"responses": "completions", "rank_column": "ranks"},
         "row 1: ranking.rank_column 'ranks' must list one rank per response (2), got 1 value"),
        ({"prompt": "p", "completions": ["a", "b"]}, {"responses": "completions"},
         "row 1: 'completions' response 1 is a plain string; name the list of its ranks with ranking.rank_column"),
        ({"prompt": "p", "responses": "a"}, {}, "row 1: ranking.responses 'responses' must be a list of responses"),
    ],
)  # fmt: skip
def test_ranked_bad_rows(tmp_path, row, ranking, expected):
    path = write_jsonl(tmp_path / "ranked.jsonl", [row])
    assert expected in load_error(path, "preference", ranking={**ranking, "better": "lower"})


def test_ranked_needs_its_direction():
    with pytest.raises(ValidationError, match="format ranked needs a ranking section"):
        DataSource(path="x.jsonl", format="ranked")
    with pytest.raises(ValidationError, match="better"):
        DataSource(path="x.jsonl", ranking={"responses": "replies"})
    with pytest.raises(ValidationError, match="ranking is read by format ranked, not 'preference'"):
        DataSource(path="x.jsonl", format="preference", ranking={"better": "lower"})


# ---------------------------------------------------------------- nested paths and prompt templates

SEED_TASKS = [
    {"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast.",
     "instances": [{"input": "", "output": "Oatmeal."}], "is_classification": False},
    {"id": "seed_task_1", "name": "antonym", "instruction": "What is the relation between the given pairs?",
     "instances": [{"input": "Night : Day :: Right : Left", "output": "They are opposites."}],
     "is_classification": False},
    {"id": "seed_task_2", "name": "sentiment", "instruction": "Is the review positive?",
     "instances": [{"input": "Great food.", "output": "Yes."}, {"input": "Cold soup.", "output": "No."}],
     "is_classification": True},
]  # fmt: skip


def test_seed_tasks_as_sft_data_keep_their_nested_input(tmp_path):
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", SEED_TASKS)
    rows, report = load(path, "sft")
    assert rows == [
        {"prompt": [user("Suggest a breakfast.")], "completion": [assistant("Oatmeal.")]},
        {"prompt": [user("What is the relation between the given pairs?\n\nNight : Day :: Right : Left")],
         "completion": [assistant("They are opposites.")]},
        {"prompt": [user("Is the review positive?\n\nGreat food.")], "completion": [assistant("Yes.")]},
    ]  # fmt: skip
    assert report.format == "alpaca"
    assert report.columns == {"instruction": "instruction", "output": "instances.0.output",
                              "input": "instances.0.input"}  # fmt: skip
    assert report.unused_columns == ["id", "name", "is_classification"]
    assert report.notes == [
        "read input from instances.0.input and output from instances.0.output (the Self-Instruct layout); 1 rows "
        "hold more than one instance, and only the first is read; map other paths with data.train.columns."
    ]


def test_seed_tasks_as_ppo_prompts_keep_their_input(tmp_path):
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", SEED_TASKS)
    rows, _ = load(path, "prompt")
    assert [row["prompt"][0]["content"] for row in rows] == [
        "Suggest a breakfast.",
        "What is the relation between the given pairs?\n\nNight : Day :: Right : Left",
        "Is the review positive?\n\nGreat food.",
    ]


def test_nested_columns_and_template_without_a_dangling_paragraph(tmp_path):
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", SEED_TASKS)
    template = "### Instruction:\n{instruction}\n\n### Input:\n{instances.0.input}\n\n### Response:\n"
    rows, report = load(path, "sft", prompt_template=template, columns={"completion": "instances.0.output"})
    assert rows[0] == {"prompt": "### Instruction:\nSuggest a breakfast.\n\n### Response:\n", "completion": "Oatmeal."}
    assert rows[1]["prompt"] == (
        "### Instruction:\nWhat is the relation between the given pairs?\n\n### Input:\nNight : Day :: Right : Left"
        "\n\n### Response:\n"
    )
    assert report.format == "prompt_completion"
    assert report.columns == {"prompt": "prompt_template", "completion": "instances.0.output"}
    assert report.unused_columns == ["id", "name", "is_classification"]


def test_template_fields_mixed_paragraph_and_literal_braces(tmp_path):
    rows = [{"q": "Sum?", "meta": {"source": "quiz", "lang": ""}, "a": "4"},
            {"q": "Diff?", "meta": {"source": "", "lang": ""}, "a": "1"}]  # fmt: skip
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    template = "{q}\n\nSource: {meta.source} {meta.lang}\n\nAnswer as {{\"answer\": ...}}"
    out, _ = load(path, "sft", prompt_template=template, columns={"completion": "a"})
    # A paragraph is left out only when every field in it is empty.
    assert [row["prompt"] for row in out] == [
        'Sum?\n\nSource: quiz \n\nAnswer as {"answer": ...}',
        'Diff?\n\nAnswer as {"answer": ...}',
    ]


def test_missing_nested_path_names_the_row_and_the_path(tmp_path):
    rows = [*SEED_TASKS[:2], {"id": "seed_task_9", "instruction": "Empty.", "instances": []}]
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", rows)
    assert load_error(path, "sft") == (
        f"data.train ({path}), row 3: columns.input 'instances.0.input' is missing: 'instances' is an empty list."
    )
    assert load_error(path, "sft", columns={"input": "instances.0.inptu", "output": "instances.0.output"}) == (
        f"data.train ({path}), row 1: columns.input 'instances.0.inptu' is missing: 'instances.0' has no value for "
        "'inptu'."
    )
    assert load_error(path, "sft", columns={"input": "meta.input"}) == (
        f"data.train ({path}): data.train.columns maps 'input' to 'meta.input', but the data has no column 'meta'; "
        "columns found: [id, name, instruction, instances, is_classification]."
    )


def test_template_naming_a_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "seed_tasks.jsonl", SEED_TASKS)
    assert load_error(path, "prompt", prompt_template="{instruction}\n\n{inptu}") == (
        f"data.train ({path}): data.train.prompt_template names column 'inptu', which is not in the data; "
        "columns found: [id, name, instruction, instances, is_classification]."
    )
    assert load_error(path, "prompt", prompt_template="{instruction}\n\n{instances.1.input}") == (
        f"data.train ({path}), row 1: prompt_template field 'instances.1.input' is missing: 'instances' has 1 item, "
        "so no item 1."
    )


def test_template_must_feed_a_format_that_reads_a_prompt(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "q": "y"}])
    assert "prompt_template builds a prompt, but format 'text' reads no prompt column" in load_error(
        path, "sft", format="text", prompt_template="{q}"
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompt_template": "{instruction"}, "prompt_template: unmatched '{' at character 1"),
        ({"prompt_template": "Answer: {}"}, "names no field"),
        ({"prompt_template": "no fields"}, "prompt_template: it names no field"),
        ({"prompt_template": "{q}", "columns": {"prompt": "q"}}, "prompt_template builds the prompt"),
    ],
)
def test_template_checked_when_the_recipe_is_read(fields, expected):
    with pytest.raises(ValidationError, match=expected):
        DataSource(path="x.jsonl", **fields)


# ---------------------------------------------------------------- notes and the report


def test_unused_columns_note_on_stderr(tmp_path, capsys):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": 1, "question": "Q", "answer": "A", "source": "web"}])
    load_data(DataSource(path=str(path), columns={"prompt": "question", "completion": "answer"}), "sft")
    captured = capsys.readouterr()
    assert "Note: data.train: columns not used: id, source." in captured.err
    assert "columns not used" not in captured.out


def test_plain_data_prints_nothing_and_reports_counts(tmp_path, capsys):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(5)])
    dataset = load_data(DataSource(path=str(path), limit=3), "sft")
    err = capsys.readouterr().err
    assert len(dataset) == 3 and "Note:" not in err and "Warning:" not in err
    _, report = load(path, "sft", limit=3)
    assert report.lines() == [f"data.train ({path}): format text (detected); 3 rows read (limit; 5 in the source), "
                              "3 rows kept."]  # fmt: skip
    assert json.loads(json.dumps(report.to_dict())) == {
        "what": "data.train", "origin": str(path), "kind": "sft", "format": "text", "detected": True,
        "columns": {"text": "text"}, "unused_columns": [], "rows_in_source": 5, "rows_read": 3, "rows_kept": 3,
        "dropped": {}, "notes": [],
    }  # fmt: skip


def test_bad_layout_keys_fail_cleanly_from_the_command_line(tmp_path):
    write_json(tmp_path / "annotations.json", [alpaca_eval_row("a", "x", "y", 1)])
    recipe = tmp_path / "rm.yaml"
    base = "stage: rm\nmodel:\n  name_or_path: builtin:tiny-gpt2\ndata:\n  train:\n    path: annotations.json\n"
    recipe.write_text(base + "    winner: {column: preference, responses: [output_1, output_2], first: [1, '1'], "
                      "second: 2.0, tie: 0, skip: [null, unsure]}\n", encoding="utf-8")  # fmt: skip
    result = CliRunner().invoke(app, ["recipe", "validate", str(recipe)])
    assert result.exit_code == 0, result.output
    recipe.write_text(base + "    winner: {column: preference, responses: [output_1, output_2], first: 1, second: 2, "
                      "tie: 1}\n", encoding="utf-8")  # fmt: skip
    assert_clean_failure(["recipe", "validate", str(recipe)], "data.train.winner", "label 1 is listed under both first "
                         "and tie")  # fmt: skip
    recipe.write_text(base + "    prompt_template: '{instruction'\n", encoding="utf-8")
    assert_clean_failure(["recipe", "validate", str(recipe)], "data.train", "prompt_template: unmatched '{'")


# ---------------------------------------------------------------- the real Self-Instruct seed tasks


def test_real_seed_tasks(shared_dir):
    path = shared_dir / "data" / "alpaca-seed" / "seed_tasks.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with_input = [row for row in raw if row["instances"][0]["input"].strip()]
    assert (len(raw), len(with_input)) == (175, 125)

    sft, report = load(path, "sft")
    assert (report.rows_read, report.rows_kept, report.dropped, report.format) == (175, 175, {}, "alpaca")
    assert report.unused_columns == ["id", "name", "is_classification"]
    for row, out in zip(raw, sft):
        first = row["instances"][0]
        expected = row["instruction"] + (f"\n\n{first['input']}" if first["input"].strip() else "")
        assert out == {"prompt": [user(expected)], "completion": [assistant(first["output"])]}

    prompts, report = load(path, "prompt")
    assert report.rows_kept == 175
    kept_input = [content for row, content in zip(raw, (p["prompt"][0]["content"] for p in prompts))
                  if row in with_input and content.endswith("\n\n" + row["instances"][0]["input"])]  # fmt: skip
    assert len(kept_input) == 125
