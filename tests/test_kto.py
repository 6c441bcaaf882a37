"""rlhf kto: unpaired thumbs-up/down rows (as given, or unpaired from preference pairs), their labels, the class
weights chosen from the training rows, the row order KTO's KL estimate needs, a tiny end-to-end run, and bad input
refused before anything is written."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY, assert_clean_failure
from rlhf_cli.cli import app
from rlhf_cli.data import IDENTICAL, load_data_with_report, unpaired_label
from rlhf_cli.errors import UserError
from rlhf_cli.lengths import kl_order
from rlhf_cli.recipe import DataSource
from rlhf_cli.stages.kto import balance_ratio, class_weights, label_balance


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(path: Path, **fields):
    return load_data_with_report(DataSource(path=str(path), **fields), "unpaired")


# ---------------------------------------------------------------- labels and class weights


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), (1.0, True), (0.0, False),
    ("true", True), ("FALSE", False), ("Yes", True), ("no", False), ("1", True), ("0", False), (" yes\n", True),
])  # fmt: skip
def test_label_spellings(value, expected):
    assert unpaired_label(value) is expected


@pytest.mark.parametrize("value", [None, 2, -1, 0.5, "", "maybe", "y", "t", "2", [1]])
def test_other_labels_are_refused_showing_the_value(value):
    with pytest.raises(ValueError, match="is not a thumbs-up or thumbs-down"):
        unpaired_label(value)


@pytest.mark.parametrize("desirable,undesirable,weights", [
    (256, 256, (1.0, 1.0)),
    (300, 100, (1.0, 3.0)),     # lambda_U = 300 / 100
    (100, 300, (3.0, 1.0)),     # lambda_D = 300 / 100
    (36, 12, (1.0, 3.0)),
    (7, 3, (1.0, 2.3333)),      # 7/3 = 2.33333..., rounded down: the ratio stays >= 1
    (3, 7, (2.3334, 1.0)),      # rounded up, for the same reason
    (2, 3, (1.5, 1.0)),
])  # fmt: skip
def test_class_weights_balance_the_two_labels(desirable, undesirable, weights):
    assert class_weights(desirable, undesirable) == weights
    ratio = balance_ratio(desirable, undesirable, weights)  # Eq. 8 of the KTO paper: within [1, 4/3]
    assert 1.0 <= ratio < 1.0001


def test_label_balance_sets_the_weights_unless_the_recipe_does():
    import datasets

    train = datasets.Dataset.from_dict({"label": [True] * 3 + [False] * 9})
    chosen, note = label_balance(SimpleNamespace(training={}), train)
    assert chosen == {"desirable_weight": 3.0, "undesirable_weight": 1.0}
    assert note.startswith("3 desirable and 9 undesirable training rows, so desirable_weight = 3 ")
    chosen, note = label_balance(SimpleNamespace(training={"undesirable_weight": 0.5}), train)
    assert chosen == {}  # the recipe's choice stands; the note gives its ratio: 1 * 3 / (0.5 * 9)
    assert "undesirable_weight 0.5" in note and "= 0.667" in note
    balanced = datasets.Dataset.from_dict({"label": [True, False] * 4})
    assert label_balance(SimpleNamespace(training={}), balanced)[0] == {"desirable_weight": 1.0,
                                                                        "undesirable_weight": 1.0}  # fmt: skip
    with pytest.raises(UserError, match="all labelled undesirable"):
        label_balance(SimpleNamespace(training={}), datasets.Dataset.from_dict({"label": [False] * 5}))


def test_kl_order_keeps_the_two_answers_to_a_prompt_apart():
    """KTO pairs each row's prompt with the previous row's completion: after `kl_order` the rows of one pair (2k,
    2k+1) are at least 3 places apart, and the labels of unpaired pairs (T, F, T, F, ...) still alternate."""
    for rows in (6, 7, 20, 243, 486):
        order = kl_order(rows)
        assert sorted(order) == list(range(rows))
        place = {row: position for position, row in enumerate(order)}
        assert min(abs(place[2 * k] - place[2 * k + 1]) for k in range(rows // 2)) >= 3
        labels = [row % 2 == 0 for row in order]
        assert all(labels[i] != labels[i + 1] for i in range(2 * (rows // 2) - 1))
    assert kl_order(8) == [0, 5, 2, 7, 4, 1, 6, 3]  # odd rows 1, 3, 5, 7 rotated by 2


# ---------------------------------------------------------------- loading


def test_unpaired_rows_with_mixed_label_spellings(tmp_path):
    rows = [{"prompt": "Hi", "completion": " there", "label": label}
            for label in (True, "No", 1, " YES ", "false", 0, "1")]  # fmt: skip
    dataset, report = load(write_jsonl(tmp_path / "u.jsonl", rows))
    assert dataset["label"] == [True, False, True, True, False, False, True]
    assert dataset.features["label"].dtype == "bool"
    assert (report.format, report.rows_read, report.rows_kept, report.dropped) == ("prompt_completion", 7, 7, {})
    assert report.notes == []


def test_unpaired_messages_from_mapped_columns_and_nested_labels(tmp_path):
    rows = [{"q": [user("2+2?")], "a": [assistant("4")], "meta": {"thumb": "yes"}},
            {"q": [user("2+2?")], "a": [assistant("5")], "meta": {"thumb": "no"}}]  # fmt: skip
    dataset, report = load(write_jsonl(tmp_path / "u.jsonl", rows),
                           columns={"prompt": "q", "completion": "a", "label": "meta.thumb"})
    assert dataset[1] == {"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False}
    assert report.columns == {"prompt": "q", "completion": "a", "label": "meta.thumb"}


def test_csv_labels_are_read_from_text(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("prompt,completion,label\nHi, there,Yes\nHi, you,no\nYo, ok,TRUE\nYo, x,0\n")
    dataset, report = load(path)
    assert dataset["label"] == [True, False, True, False] and report.rows_kept == 4


def test_preference_pairs_are_unpaired_with_one_note(tmp_path):
    rows = [{"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]},
            {"prompt": [user("1+1?")], "chosen": [assistant("2")], "rejected": [assistant("2")]},  # identical
            {"prompt": [user("3+3?")], "chosen": [assistant("6")], "rejected": [assistant("7")]}]  # fmt: skip
    dataset, report = load(write_jsonl(tmp_path / "p.jsonl", rows))
    assert (report.format, report.kind, report.rows_read, report.rows_kept) == ("preference", "unpaired", 3, 4)
    assert report.dropped == {IDENTICAL: 1}
    assert dataset["label"] == [True, False, True, False]
    assert dataset[0] == {"prompt": [user("2+2?")], "completion": [assistant("4")], "label": True}
    assert dataset[3] == {"prompt": [user("3+3?")], "completion": [assistant("7")], "label": False}
    notes = [line for line in report.notices() if line.startswith("Note:")]
    assert notes == ["Note: data.train: read 2 preference pairs (format preference) as 4 unpaired rows for KTO: each "
                     "pair's chosen response labelled desirable (true), its rejected one undesirable (false)."]


def test_the_tiny_preference_file_unpaired():
    dataset, report = load(TINY / "data" / "preference.jsonl")
    assert (report.rows_read, report.rows_kept, sum(dataset["label"])) == (256, 512, 256)


def test_conversations_without_a_prompt_give_up_their_shared_turns(tmp_path):
    rows = [{"chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")]}]
    dataset, _ = load(write_jsonl(tmp_path / "p.jsonl", rows))
    assert dataset.to_list() == [{"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": True},
                                 {"prompt": [user("Hi")], "completion": [assistant("Go away.")], "label": False}]


def test_a_ranking_keeps_its_best_response_once(tmp_path):
    rows = [{"prompt": "Name a colour.", "responses": [{"text": " red", "rank": 1}, {"text": " car", "rank": 2},
                                                       {"text": " dog", "rank": 3}]}]  # fmt: skip
    dataset, report = load(write_jsonl(tmp_path / "r.jsonl", rows), ranking={"better": "lower"})
    assert [(row["completion"], row["label"]) for row in dataset] == [(" red", True), (" car", False),
                                                                      (" dog", False)]  # fmt: skip
    assert "2 preference pairs (format ranked) as 3 unpaired rows" in report.notes[0]
    assert "1 repeated best response of a ranking kept once as desirable" in report.notes[0]


@pytest.mark.parametrize("rows,fields,fragments", [
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": "maybe"}], {},
     ["row 2", "label 'maybe' is not a thumbs-up or thumbs-down"]),
    ([{"prompt": "a", "completion": "b", "label": None}, {"prompt": "a", "completion": "c", "label": 1}], {},
     ["row 1", "label null"]),
    ([{"prompt": "a", "completion": "b", "label": 1}, {"prompt": "c", "completion": "d", "label": "yes"}], {},
     ["all 2 rows are labelled desirable (true)", "at least one row of each label"]),
    ([{"prompt": "a", "completion": "b"}], {},
     ["prompt and completion but no label column", "{label: thumbs_up}"]),
    ([{"prompt": "a", "completion": "b"}], {"format": "prompt_completion"},
     ["needs the columns prompt+completion+label", "missing: label"]),
    ([{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}], {},
     ["row 1", "the pair has no prompt"]),
    ([{"text": "hello"}], {}, ["unpaired (KTO) data needs prompt+completion+label"]),
])  # fmt: skip
def test_bad_unpaired_data_is_one_clear_error(tmp_path, rows, fields, fragments):
    with pytest.raises(UserError) as caught:
        load(write_jsonl(tmp_path / "bad.jsonl", rows), **fields)
    message = str(caught.value)
    assert all(fragment in message for fragment in fragments), message


@pytest.mark.slow  # the first builtin tokenizer of the session is built here (the end-to-end run reuses it)
def test_unpaired_rows_are_tokenized_as_trls_kto_trainer_does():
    """`encode_unpaired` against KTOTrainer._prepare_dataset itself (text with EOS, and the chat template)."""
    import datasets
    from trl import KTOConfig, KTOTrainer

    from rlhf_cli.lengths import encode_unpaired
    from rlhf_cli.models import load_tokenizer, resolve_model_path
    from rlhf_cli.recipe import ModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-gpt2")
    tokenizer = load_tokenizer(spec, resolve_model_path(spec, 42), conversational=True)
    trainer = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False)  # what _prepare_dataset reads of self
    args = KTOConfig(output_dir="unused", max_length=None, report_to="none", use_cpu=True, bf16=False)
    for rows in ({"prompt": ["What is 2 plus 3?", "Hi"], "completion": [" 5.", " there"], "label": [True, False]},
                 {"prompt": [[user("What is 2 plus 3?")]], "completion": [[assistant("5.")]], "label": [True]}):
        theirs = KTOTrainer._prepare_dataset(trainer, datasets.Dataset.from_dict(rows), tokenizer, args, "eval")
        for row, their in zip(datasets.Dataset.from_dict(rows), theirs):
            ours = encode_unpaired(tokenizer, row)
            assert ours.sequences[0][: ours.boundary] == their["prompt_ids"]
            assert ours.sequences[0][ours.boundary :] == their["completion_ids"]


def test_a_row_without_prompt_or_completion_tokens_is_named():
    import datasets

    from rlhf_cli.lengths import Encoded, check_unpaired

    rows = datasets.Dataset.from_dict({"prompt": ["fine", "ab"], "completion": ["x", "c"], "label": [True, False]})
    with pytest.raises(UserError, match=r"data.train, row 2 \(prompt 'ab'\): no token of the prompt is left"):
        check_unpaired([Encoded([[1, 2, 3]], 1), Encoded([[7, 8]], 0)], rows, "data.train")
    with pytest.raises(UserError, match=r"row 1 \(prompt 'fine'\): the completion has no token after the prompt"):
        check_unpaired([Encoded([[1, 2]], 2), Encoded([[7, 8]], 1)], rows, "data.train")


# ---------------------------------------------------------------- the command


def write_recipe(path: Path, data: Path, model: str = "builtin:tiny-gpt2", eval_data: Path | None = None,
                 **training) -> Path:
    recipe = {"stage": "kto", "model": {"name_or_path": model}, "data": {"train": {"path": str(data)},
              "max_length": 64}, "training": {"per_device_train_batch_size": 4, "activation_checkpointing": False,
              **training}, "seed": 42}  # fmt: skip
    if eval_data is not None:
        recipe["data"]["eval"] = {"path": str(eval_data)}
    path.write_text(yaml.safe_dump(recipe))
    return path


UNPAIRED = [{"prompt": "Hi", "completion": f" reply {n}", "label": n % 2 == 0} for n in range(8)]


@pytest.mark.parametrize("rows,training,fragments", [
    ([{**row, "label": True} for row in UNPAIRED], {}, ["all 8 rows are labelled desirable (true)"]),
    (UNPAIRED, {"per_device_train_batch_size": 1},
     ["per_device_train_batch_size is 1", "at least 2 rows per device batch"]),
    (UNPAIRED, {"loss_type": "sigmoid"},
     ["training.loss_type: 'sigmoid' is not a loss type", "known: apo_zero_unpaired, kto"]),
    ([{"prompt": row["prompt"], "completion": row["completion"]} for row in UNPAIRED], {},
     ["no label column"]),
    (UNPAIRED[:3] + [{**UNPAIRED[3], "label": "sometimes"}], {}, ["row 4", "label 'sometimes'"]),
])  # fmt: skip
def test_bad_kto_input_exits_2_and_writes_nothing(tmp_path, rows, training, fragments):
    recipe = write_recipe(tmp_path / "kto.yaml", write_jsonl(tmp_path / "u.jsonl", rows), **training)
    out = tmp_path / "run"
    assert_clean_failure(["kto", str(recipe), "-o", str(out)], *fragments, out=out)


def test_data_inspect_reads_a_kto_recipe(tmp_path):
    recipe = write_recipe(tmp_path / "kto.yaml", TINY / "data" / "preference.jsonl")
    result = CliRunner().invoke(app, ["data", "inspect", str(recipe), "--set", "data.train.limit=8"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "kto recipe, read as TRL KTOTrainer reads it" in text
    assert "rows           8 read (limit; 256 in the source), 16 kept by the loader" in text
    assert "read 8 preference pairs" in text
    assert "labels         8 desirable (true), 8 undesirable (false)" in text
    assert "    desirable (" in text and "    undesirable (" in text  # rows 1 and 2: one pair's two answers


@pytest.mark.slow
def test_kto_end_to_end_on_imbalanced_unpaired_rows(tmp_path):
    """A tiny SFT policy, then KTO on 36 desirable and 12 undesirable conversations (labels spelled several ways)
    against the reference kto.ref_model names: undesirable_weight 3 reaches TRL, held-out metrics are reported,
    and the model loads as a plain causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    runner = CliRunner()
    sft = tmp_path / "sft"
    result = runner.invoke(app, ["sft", str(TINY / "sft.yaml"), "-o", str(sft), "--set", "training.max_steps=2",
                                 "--set", "training.save_steps=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in (TINY / "data" / "preference.jsonl").read_text().splitlines()]
    spellings = [True, "yes", 1, "TRUE"]
    train = [{"prompt": p["prompt"], "completion": p["chosen"], "label": spellings[n % 4]}
             for n, p in enumerate(pairs[:36])]  # fmt: skip
    train += [{"prompt": p["prompt"], "completion": p["rejected"], "label": "no"} for p in pairs[36:48]]
    held = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
            for p in pairs[200:204] for key in ("chosen", "rejected")]  # fmt: skip
    recipe = write_recipe(tmp_path / "kto.yaml", write_jsonl(tmp_path / "train.jsonl", train), model=str(sft),
                          eval_data=write_jsonl(tmp_path / "held.jsonl", held), max_steps=4, save_steps=4,
                          learning_rate=5e-4)  # fmt: skip
    out = tmp_path / "kto"
    # kto.ref_model names the reference (here the same weights again): the generalised dpo `reference_model`
    result = runner.invoke(app, ["kto", str(recipe), "-o", str(out), "--set", f"kto.ref_model={sft}"])
    assert result.exit_code == 0, result.output
    assert f"ref_model: {sft}" in (out / "recipe.yaml").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["stage"], summary["rows read"], summary["rows kept"], summary["steps"]) == ("kto", 48, 48, 4)
    assert summary["eval rows kept"] == 8 and summary["held-out rows"] == 8
    assert summary["set from the data"].startswith("36 desirable and 12 undesirable training rows, so "
                                                   "undesirable_weight = 3 (the other 1.0)")
    for metric in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl"):
        assert f"held-out {metric}" in summary, metric
    args = torch.load(out / "training_args.bin", weights_only=False)  # the TRL config the trainer ran with
    assert (args.desirable_weight, args.undesirable_weight) == (1.0, 3.0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_dry_run_says_the_class_weights_the_run_will_set(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 4 == 0} for i in range(40)]  # 10 true, 30 false
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = CliRunner().invoke(app, ["kto", str(TINY / "kto.yaml"), "--dry-run", "-o", str(tmp_path / "out"),
                                      "--set", f"data.train.path={data}", "--set", "data.eval_split=0",
                                      "--set", "model.name_or_path=builtin:tiny-gpt2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "10 desirable and 30 undesirable training rows, so desirable_weight = 3" in text
    assert not (tmp_path / "out").exists()
