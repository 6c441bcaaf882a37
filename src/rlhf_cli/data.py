"""Load training data and convert it to the dataset formats TRL's trainers take as they are.

SFT data becomes one of `{"text"}`, `{"prompt", "completion"}` (text or message lists) or `{"messages"}`;
preference data becomes `{"prompt", "chosen", "rejected"}` or `{"chosen", "rejected"}`. Messages are
`{"role", "content"}` dicts. Every problem with the data is raised as a `UserError` that says where it is.

`datasets` is imported inside the functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from rlhf_cli.recipe import DataSource

Kind = Literal["sft", "preference", "prompt"]
Row = dict[str, Any]

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_TRL_ROLES = {role: role for role in ("system", "user", "assistant", "tool")}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# A turn marker at the very start or after a blank line; the text before "Human:" in HH is "\n\n".
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class _RowError(Exception):
    """A problem with one row's fields; `load_data` adds which data set and row."""


# ---------------------------------------------------------------- field helpers


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, str):
        return "a string" if value else "an empty string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, (list, tuple)):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _field(row: Row, key: str) -> Any:
    value = row.get(key)
    if value is None:
        raise _RowError(f"field {key!r} is missing")
    return value


def _text(row: Row, key: str) -> str:
    value = _field(row, key)
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {_describe(value)}")
    if not value.strip():
        raise _RowError(f"field {key!r} is empty")
    return value


def _optional_text(row: Row, key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _RowError(f"field {key!r} must be a string, got {_describe(value)}")
    return value


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _messages(value: Any, key: str) -> list[dict[str, str]]:
    """Validate a list of chat messages and keep only role and content."""
    if not isinstance(value, list) or not value:
        raise _RowError(f"field {key!r} must be a non-empty list of messages, got {_describe(value)}")
    return [_turn(message, f"{key!r} message {n}", "role", "content", _TRL_ROLES)
            for n, message in enumerate(value, 1)]


def _text_or_messages(row: Row, key: str) -> str | list[dict[str, str]]:
    value = _field(row, key)
    return _messages(value, key) if isinstance(value, list) else _text(row, key)


def _same_style(out: Row) -> Row:
    """TRL wants every field of a row as text, or every field as a message list."""
    lists = [key for key, value in out.items() if isinstance(value, list)]
    if lists and len(lists) < len(out):
        texts = [key for key in out if key not in lists]
        raise _RowError(
            f"fields mix message lists ({', '.join(map(repr, lists))}) and text ({', '.join(map(repr, texts))}); "
            "use text for all of them or message lists for all of them"
        )
    return out


# ---------------------------------------------------------------- one function per format


def _from_text(row: Row) -> Row:
    return {"text": _text(row, "text")}


def _from_prompt_completion(row: Row) -> Row:
    return _same_style({key: _text_or_messages(row, key) for key in ("prompt", "completion")})


def _from_messages(row: Row) -> Row:
    return {"messages": _messages(_field(row, "messages"), "messages")}


def _from_preference(row: Row) -> Row:
    keys = ("prompt", "chosen", "rejected") if "prompt" in row else ("chosen", "rejected")
    return _same_style({key: _text_or_messages(row, key) for key in keys})


def _alpaca_prompt(row: Row) -> list[dict[str, str]]:
    """[system?] + history turns + the instruction (and its input) as the user turn."""
    messages = []
    system = _optional_text(row, "system")
    if system.strip():
        messages.append(_message("system", system))
    history = row.get("history") or []
    if not isinstance(history, list):
        raise _RowError(f"field 'history' must be a list of [query, answer] pairs, got {_describe(history)}")
    for n, pair in enumerate(history, 1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)):
            raise _RowError(f"'history' item {n} must be a [query, answer] pair of strings, got {pair!r:.60}")
        messages += [_message("user", pair[0]), _message("assistant", pair[1])]
    user = _text(row, "instruction")
    extra = _optional_text(row, "input")
    if extra.strip():
        user += "\n\n" + extra
    messages.append(_message("user", user))
    return messages


def _from_alpaca_sft(row: Row) -> Row:
    return {"prompt": _alpaca_prompt(row), "completion": [_message("assistant", _text(row, "output"))]}


def _from_alpaca_preference(row: Row) -> Row:
    return {
        "prompt": _alpaca_prompt(row),
        "chosen": [_message("assistant", _text(row, "chosen"))],
        "rejected": [_message("assistant", _text(row, "rejected"))],
    }


def _sharegpt_turn(turn: Any, label: str) -> dict[str, str]:
    return _turn(turn, label, "from", "value", _SHAREGPT_ROLES)


def _turn(turn: Any, label: str, role_key: str, text_key: str, roles: dict[str, str]) -> dict[str, str]:
    """One checked turn `{role_key, text_key}` -> `{role, content}`, the role mapped through `roles`."""
    if not isinstance(turn, dict):
        raise _RowError(f"{label} must be a mapping with {role_key!r} and {text_key!r}, got {_describe(turn)}")
    role, text = turn.get(role_key), turn.get(text_key)
    if role is None:
        raise _RowError(f"{label} has no {role_key!r}")
    if role not in roles:
        raise _RowError(f"{label} has unknown role {role!r} (expected {', '.join(roles)})")
    if not isinstance(text, str):
        raise _RowError(f"{label} needs a string {text_key!r}, got {_describe(text)}")
    return _message(roles[role], text)


def _sharegpt_messages(row: Row) -> list[dict[str, str]]:
    turns = _field(row, "conversations")
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"field 'conversations' must be a non-empty list of turns, got {_describe(turns)}")
    messages = [_sharegpt_turn(turn, f"'conversations' turn {n}") for n, turn in enumerate(turns, 1)]
    system = _optional_text(row, "system")
    if system.strip():
        messages.insert(0, _message("system", system))
    return messages


def _from_sharegpt_sft(row: Row) -> Row:
    return {"messages": _sharegpt_messages(row)}


def _from_sharegpt_preference(row: Row) -> Row:
    prompt = _sharegpt_messages(row)
    if prompt[-1]["role"] != "user":
        last = prompt[-1]["role"]
        raise _RowError(f"'conversations' must end with a human turn to answer, but its last turn is {last!r}")
    out: Row = {"prompt": prompt}
    for key in ("chosen", "rejected"):
        answer = _sharegpt_turn(_field(row, key), f"field {key!r}")
        if answer["role"] != "assistant":
            raise _RowError(f"field {key!r} must be a gpt/assistant turn, got one from {row[key]['from']!r}")
        out[key] = [answer]
    return out


def _parse_hh(row: Row, key: str) -> list[dict[str, str]]:
    """Split an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_MARKER.split(_text(row, key))
    if parts[0].strip():
        raise _RowError(
            f"field {key!r} must be a transcript starting with '\\n\\nHuman:', but it starts with {parts[0]!r:.40}"
        )
    return [
        _message("user" if speaker == "Human" else "assistant", body.removeprefix(" "))
        for speaker, body in zip(parts[1::2], parts[2::2])
    ]


def _from_hh_sft(row: Row) -> Row:
    return {"messages": _parse_hh(row, "chosen")}


def _from_hh_preference(row: Row) -> Row:
    chosen, rejected = _parse_hh(row, "chosen"), _parse_hh(row, "rejected")
    if chosen == rejected:
        raise _RowError("'chosen' and 'rejected' are the same transcript")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not any(message["role"] == "user" for message in prompt):
        raise _RowError("'chosen' and 'rejected' share no Human turn")
    if prompt[-1]["role"] != "user":
        raise _RowError("'chosen' and 'rejected' still share an Assistant turn after their last shared Human turn")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) == shared:
            raise _RowError(f"{key!r} has no turn after the part it shares with the other transcript")
    return {"prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _from_prompt(row: Row) -> Row:
    return {"prompt": _text_or_messages(row, "prompt")}


def _from_alpaca_prompt(row: Row) -> Row:
    return {"prompt": _alpaca_prompt(row)}


# (format, kind) -> (columns it needs, converter of one row)
_FORMATS: dict[tuple[str, str], tuple[tuple[str, ...], Callable[[Row], Row]]] = {
    ("text", "sft"): (("text",), _from_text),
    ("prompt_completion", "sft"): (("prompt", "completion"), _from_prompt_completion),
    ("messages", "sft"): (("messages",), _from_messages),
    ("alpaca", "sft"): (("instruction", "output"), _from_alpaca_sft),
    ("sharegpt", "sft"): (("conversations",), _from_sharegpt_sft),
    ("hh", "sft"): (("chosen",), _from_hh_sft),
    ("preference", "preference"): (("chosen", "rejected"), _from_preference),
    ("alpaca", "preference"): (("instruction", "chosen", "rejected"), _from_alpaca_preference),
    ("sharegpt", "preference"): (("conversations", "chosen", "rejected"), _from_sharegpt_preference),
    ("hh", "preference"): (("chosen", "rejected"), _from_hh_preference),
    # Prompts for PPO rollouts: the prompt part of any format that has one.
    ("prompt", "prompt"): (("prompt",), _from_prompt),
    ("prompt_completion", "prompt"): (("prompt",), _from_prompt),
    ("preference", "prompt"): (("prompt",), _from_prompt),
    ("alpaca", "prompt"): (("instruction",), _from_alpaca_prompt),
}
_KIND_NEEDS = {
    "sft": "an SFT dataset needs text, prompt+completion, messages, conversations (sharegpt), "
    "instruction+output (alpaca) or chosen holding an HH transcript (hh)",
    "preference": "a preference dataset needs chosen+rejected (optionally prompt), "
    "conversations+chosen+rejected (sharegpt) or instruction+chosen+rejected (alpaca); "
    "chosen+rejected holding HH transcripts are read as hh",
    "prompt": "a prompt dataset needs prompt (text or messages) or instruction (alpaca); map another column "
    "with columns, e.g. {prompt: question}",
}


# ---------------------------------------------------------------- loading


def load_data(source: DataSource, kind: Kind, *, what: str = "data.train") -> datasets.Dataset:
    """Load `source` and return it in TRL's format for `kind` ("sft" or "preference"), canonical columns only.

    Row numbers in errors count from 1 over the rows read (over all files, in name order, for a directory).
    """
    origin = source.path if source.path is not None else f"hub dataset {source.name!r}"
    where = f"{what} ({origin})"
    ds = _load_local(Path(source.path), where, what) if source.path is not None else _load_hub(source, what)
    if source.limit is not None and source.limit < len(ds):
        ds = ds.select(range(source.limit))
    if len(ds) == 0:
        raise UserError(f"{where} has no rows.")
    ds = _rename_columns(ds, source.columns, where, what)

    fmt = source.format if source.format != "auto" else _detect_format(ds, kind, where, what)
    if (fmt, kind) not in _FORMATS:
        fitting = [name for name, k in _FORMATS if k == kind]
        needs = {"sft": "SFT data", "preference": "preference pairs (chosen/rejected)", "prompt": "prompts"}[kind]
        raise UserError(
            f"{where}: format {fmt!r} does not fit this stage, which needs {needs}; "
            f"use one of the formats auto, {', '.join(fitting)}."
        )
    required, convert = _FORMATS[(fmt, kind)]
    missing = [column for column in required if column not in ds.column_names]
    if missing:
        raise UserError(
            f"{where}: format {fmt!r} needs the columns {'+'.join(required)} for {kind} data; missing: "
            f"{', '.join(missing)}; columns found: [{', '.join(ds.column_names)}]; map them with {what}.columns."
        )

    kwargs = {"convert": convert, "where": where}
    # Every row must have the first row's shape (text vs messages), or TRL would see mixed columns.
    kwargs["expected"] = _shape(_convert_row(ds[0], 0, expected=None, **kwargs))
    converted = ds.map(
        _convert_batch,
        batched=True,  # a row at a time costs about twice as long in datasets' own overhead
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=ds.column_names,
        # The cache fingerprint would not notice changes to the converters, so always convert afresh.
        load_from_cache_file=False,
        desc=f"Reading {what}",
    )
    # map keeps a replaced column (e.g. chosen) where it was and appends new ones; put them in TRL's order.
    return converted.select_columns(list(kwargs["expected"]))


def _convert_batch(batch: dict[str, list], indices: list[int], *, expected: dict, **kwargs: Any) -> dict[str, list]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = [_convert_row(row, index, expected=expected, **kwargs) for row, index in zip(rows, indices)]
    return {key: [row[key] for row in out] for key in expected}


def _convert_row(row: Row, index: int, *, convert: Callable[[Row], Row], where: str, expected: dict | None) -> Row:
    """The one place that turns a row problem into a UserError naming the data and the row."""
    try:
        out = convert(row)
        for key, style in _shape(out).items():
            if expected is not None and style != expected[key]:
                raise _RowError(f"field {key!r} holds {style} here but {expected[key]} in row 1")
    except _RowError as exc:
        raise UserError(f"{where}, row {index + 1}: {exc}.") from None
    return out


def _shape(row: Row) -> dict[str, str]:
    return {key: "messages" if isinstance(value, list) else "text" for key, value in row.items()}


def _builder_for(path: Path) -> str | None:
    name = path.name.lower()
    return next((builder for suffix, builder in _BUILDERS.items() if name.endswith(suffix)), None)


def _load_local(path: Path, where: str, what: str) -> datasets.Dataset:
    import datasets

    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and _builder_for(p))
        if not files:
            raise UserError(f"{where}: the directory holds no {', '.join(_BUILDERS)} files.")
    else:
        files = [path]
    builders = {_builder_for(p) for p in files}
    if None in builders:
        raise UserError(
            f"{where}: cannot read this kind of file; use {', '.join(_BUILDERS)} (or a directory of them), "
            f"or set {what}.name for a hub dataset."
        )
    if len(builders) > 1:
        kinds = " and ".join(sorted(builders))
        raise UserError(f"{where}: the directory mixes {kinds} files; keep one kind per directory.")
    for file in files:
        if file.stat().st_size == 0:
            raise UserError(f"{what} ({file}): the file is empty.")
    (builder,) = builders

    kwargs: dict[str, Any] = {}
    if builder == "csv":
        # Read every CSV cell as text ("42" stays a string, an empty cell is "" rather than null).
        with open(files[0], newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        features = datasets.Features({column: datasets.Value("string") for column in header})
        kwargs = {"features": features, "keep_default_na": False}
    try:
        with _quiet_datasets_logging():
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **kwargs)
    except Exception as exc:
        # datasets reports "no rows" as StopIteration (empty JSON lines) or "corresponds to no data" ([]).
        if isinstance(exc, StopIteration) or "corresponds to no data" in str(exc):
            raise UserError(f"{where} has no rows.") from None
        if builder == "json":
            for file in files:
                problem = _json_problem(file)
                if problem:
                    raise UserError(f"{what} ({file}) is not valid JSON or JSON lines: {problem}.") from None
        raise UserError(f"{where}: cannot read it as {builder.upper()} ({_reason(exc)}).") from None


def _json_problem(file: Path) -> str | None:
    """Where a JSON (array) or JSON-lines file stops parsing; datasets' own message lacks the line number."""
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as exc:
        whole = exc
    if text.lstrip().startswith("["):
        return f"line {whole.lineno}, column {whole.colno}: {whole.msg}"
    for number, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: {exc.msg}"
    return None


def _load_hub(source: DataSource, what: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as exc:
        config = f", config {source.config!r}" if source.config else ""
        raise UserError(
            f"{what}: cannot load hub dataset {source.name!r}{config}, split {source.split!r} ({_reason(exc)}). "
            f"Check the name and your network, or download the data and set {what}.path to a local "
            ".jsonl/.json/.parquet/.csv file or directory instead."
        ) from None


@contextmanager
def _quiet_datasets_logging():
    """datasets logs its own 'Failed to load JSON' line before raising; the UserError says it better."""
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


def _reason(exc: BaseException) -> str:
    """First line of an error, looking through datasets' generic 'An error occurred' wrapper."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(exc, DatasetGenerationError) and (exc.__cause__ or exc.__context__):
        exc = exc.__cause__ or exc.__context__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _rename_columns(ds: datasets.Dataset, columns: dict[str, str], where: str, what: str) -> datasets.Dataset:
    """Apply `columns` (canonical name -> source column); a canonical column it replaces is dropped."""
    renamed = {canonical: source for canonical, source in columns.items() if source != canonical}
    for canonical, source in columns.items():
        if source not in ds.column_names:
            raise UserError(
                f"{where}: {what}.columns maps {canonical!r} to column {source!r}, which is not in the data; "
                f"columns found: [{', '.join(ds.column_names)}]."
            )
    if len(set(columns.values())) < len(columns):
        raise UserError(f"{where}: {what}.columns maps several names to the same column; map each column once.")
    if not renamed:
        return ds
    renames = {source: canonical for canonical, source in renamed.items()}
    replaced = [c for c in renames.values() if c in ds.column_names and c not in renames]
    return ds.remove_columns(replaced).rename_columns(renames)


def _looks_like_hh(value: Any) -> bool:
    return isinstance(value, str) and "\n\nHuman:" in value and "\n\nAssistant:" in value


def _detect_format(ds: datasets.Dataset, kind: Kind, where: str, what: str) -> str:
    """Guess the format from the column names (and, for HH, the first `chosen` value)."""
    columns = set(ds.column_names)
    hh = "chosen" in columns and _looks_like_hh(ds[0]["chosen"])
    if kind == "prompt":
        if "prompt" in columns:
            return "prompt"
        if "instruction" in columns:
            return "alpaca"
    elif kind == "preference":
        if {"chosen", "rejected"} <= columns:
            if "conversations" in columns:
                return "sharegpt"
            if "instruction" in columns:
                return "alpaca"
            if "prompt" not in columns and hh:
                return "hh"
            return "preference"
    else:
        for fmt, needs in (
            ("messages", {"messages"}),
            ("sharegpt", {"conversations"}),
            ("alpaca", {"instruction", "output"}),
            ("prompt_completion", {"prompt", "completion"}),
            ("text", {"text"}),
        ):
            if needs <= columns:
                return fmt
        if hh:
            return "hh"
    raise UserError(
        f"{where}: cannot tell the format from columns [{', '.join(ds.column_names)}]; {_KIND_NEEDS[kind]}; "
        f"set {what}.format or {what}.columns."
    )
