"""Load training data and convert it to the dataset formats TRL's trainers take as they are.

SFT data becomes one of `{"text"}`, `{"prompt", "completion"}` (text or message lists) or `{"messages"}`;
preference data becomes `{"prompt", "chosen", "rejected"}` or `{"chosen", "rejected"}`; unpaired (KTO) data becomes
`{"prompt", "completion", "label"}` with a boolean label, read as such or made from preference pairs. Messages are
`{"role", "content"}` dicts. Every problem with the data is raised as a `UserError` that says where it is.

Each row goes through two pure steps: `_prepare` reads the source's layout (the `columns` map, which may name
nested paths, `prompt_template`, a `winner` label column, a `ranking` list) into the names a format reads, and
the format's converter turns that into TRL's columns. Rows left out on purpose (ties, identical pairs) are
counted in a `DataReport`, never dropped silently.

`datasets` is imported inside the functions: importing this module must stay cheap for the CLI.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

    from rlhf_cli.recipe import DataSource, RankingSpec, WinnerSpec

Kind = Literal["sft", "preference", "prompt", "unpaired", "candidates"]
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


class _Skip(Exception):
    """A row (raised) or one pair of a ranked row (returned in the converter's list) left out on purpose.

    `reason` is the report's key and reads after a count ("3 rows labelled a tie"); `detail` says why for this row.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# Reasons a row or pair is left out; each reads after its count.
TIE = "rows labelled a tie"
SKIPPED_LABEL = "rows with a label listed in winner.skip"
IDENTICAL = "pairs with identical chosen and rejected"
FEW_RANKED = "rankings with fewer than two ranked responses"
TIED_WITH_BEST = "pairs tied with the best response"
UNRANKED = "responses without a rank"


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
    messages = [
        _message("user" if speaker == "Human" else "assistant", body.removeprefix(" "))
        for speaker, body in zip(parts[1::2], parts[2::2])
    ]
    if not any(message["role"] == "assistant" for message in messages):
        raise _RowError(f"field {key!r} is an HH transcript with no Assistant turn (no '\\n\\nAssistant:' marker)")
    return messages


def _from_hh_sft(row: Row) -> Row:
    return {"messages": _parse_hh(row, "chosen")}


def _from_hh_preference(row: Row) -> Row:
    chosen, rejected = _parse_hh(row, "chosen"), _parse_hh(row, "rejected")
    if chosen == rejected:
        raise _Skip(IDENTICAL, "'chosen' and 'rejected' are the same transcript")
    return _split_shared_turns(chosen, rejected)


def _split_shared_turns(chosen: list[dict[str, str]], rejected: list[dict[str, str]]) -> Row:
    """Two whole conversations -> the turns they share (the prompt, ending with a user turn) and each one's rest."""
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


def _from_ranked(row: Row) -> list[Row | _Skip]:
    """Preference pairs from one prompt's ranked responses: the best response against each other one.

    `row["responses"]` holds `{"text", "rank"}` items with lower rank = better (see `_ranked_responses`); unranked
    responses and responses tied with the best are returned as `_Skip`s so the loader counts them. Best-vs-each
    gives n-1 pairs from n responses rather than n(n-1)/2: a prompt with many responses does not outweigh the others
    quadratically, and every pair is the ranking's clearest comparison for the response it rejects.
    """
    prompt = _text_or_messages(row, "prompt")
    responses = row["responses"]
    ranked = [response for response in responses if response["rank"] is not None]
    unranked = [_Skip(UNRANKED, f"response {n} has no rank") for n, response in enumerate(responses, 1)
                if response["rank"] is None]  # fmt: skip
    if len(ranked) < 2:
        raise _Skip(FEW_RANKED, f"it has {len(ranked)} ranked response{'s' if len(ranked) != 1 else ''}")
    best = min(ranked, key=lambda response: response["rank"])  # the first listed among equals

    def answer(text: str) -> str | list[dict[str, str]]:
        return [_message("assistant", text)] if isinstance(prompt, list) else text

    out: list[Row | _Skip] = list(unranked)
    for response in ranked:
        if response is best:
            continue
        if response["rank"] == best["rank"]:
            out.append(_Skip(TIED_WITH_BEST, "a response ties with the best one"))
        else:
            out.append({"prompt": prompt, "chosen": answer(best["text"]), "rejected": answer(response["text"])})
    return out


# ---------------------------------------------------------------- unpaired (KTO) rows

_LABEL_WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def unpaired_label(value: Any) -> bool:
    """A thumbs-up / thumbs-down label as a bool: true/false, 1/0 (numbers), or the strings true/false, yes/no, 1/0
    in any case and with surrounding spaces. Anything else (null, 2, "maybe", "") is a ValueError that shows it."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABEL_WORDS:
        return _LABEL_WORDS[value.strip().lower()]
    shown = "null" if value is None else repr(value)
    raise ValueError(f"label {shown} is not a thumbs-up or thumbs-down; use true/false, 1/0 or yes/no")


def _from_unpaired(row: Row) -> Row:
    out = _same_style({key: _text_or_messages(row, key) for key in ("prompt", "completion")})
    try:
        out["label"] = unpaired_label(row.get("label"))
    except ValueError as exc:
        raise _RowError(f"field 'label': {exc}") from None
    return out


def _prompted(convert: Callable[[Row], Any]) -> Callable[[Row], Any]:
    """A preference converter whose pairs all carry a prompt, for unpairing: KTO scores each completion GIVEN its
    prompt. Conversations without a prompt column give up the turns they share (as HH transcripts do); a text pair
    without one is an error, since cutting two strings at their shared characters would split words."""

    def convert_with_prompt(row: Row) -> Any:
        result = convert(row)
        return [_with_prompt(item) for item in result] if isinstance(result, list) else _with_prompt(result)

    return convert_with_prompt


def _with_prompt(pair: Row | _Skip) -> Row | _Skip:
    if isinstance(pair, _Skip) or "prompt" in pair or pair["chosen"] == pair["rejected"]:
        return pair  # identical pairs are dropped (and counted) by the loader
    if isinstance(pair["chosen"], list):
        return _split_shared_turns(pair["chosen"], pair["rejected"])
    raise _RowError("the pair has no prompt, and KTO trains each completion given its prompt; add a prompt column "
                    "(or map one with columns, e.g. {prompt: question}, or build it with prompt_template), or give "
                    "chosen and rejected as whole conversations whose shared turns are the prompt")  # fmt: skip


def unpair(pairs: list[Row]) -> list[Row]:
    """Preference pairs -> unpaired rows: each pair (x, y_w, y_l) gives (x, y_w, true) and then (x, y_l, false).
    A desirable row equal to the one just before it (a ranking's best response, paired with each other response)
    is kept once: KTO judges each response, and class weights, not repeats, balance the labels."""
    rows: list[Row] = []
    last_desirable = None
    for pair in pairs:
        desirable = {"prompt": pair["prompt"], "completion": pair["chosen"], "label": True}
        if desirable != last_desirable:
            rows.append(desirable)
        last_desirable = desirable
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def _from_candidates(row: Row) -> Row:
    """A prompt and its K >= 2 candidate responses (strings, or mappings with a `text`), for `rlhf label`."""
    responses = _field(row, "responses")
    if not isinstance(responses, list):
        raise _RowError(f"field 'responses' must be a list of responses, got {_describe(responses)}")
    texts = []
    for n, response in enumerate(responses, 1):
        text = response.get("text") if isinstance(response, dict) else response
        if not isinstance(text, str) or not text.strip():
            raise _RowError(f"'responses' item {n} must be a non-empty string (or a mapping with one in 'text'), got "
                            f"{_describe(response)}")  # fmt: skip
        texts.append(text)
    if len(texts) < 2:
        raise _RowError(f"'responses' holds {len(texts)} response(s); labelling compares at least two per prompt")
    return {"prompt": _text_or_messages(row, "prompt"), "responses": texts}


# (format, kind) -> (columns it needs, columns it also reads when present, converter of one row)
_FORMATS: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...], Callable[[Row], Any]]] = {
    ("text", "sft"): (("text",), (), _from_text),
    ("prompt_completion", "sft"): (("prompt", "completion"), (), _from_prompt_completion),
    ("messages", "sft"): (("messages",), (), _from_messages),
    ("alpaca", "sft"): (("instruction", "output"), ("input", "system", "history"), _from_alpaca_sft),
    ("sharegpt", "sft"): (("conversations",), ("system",), _from_sharegpt_sft),
    ("hh", "sft"): (("chosen",), (), _from_hh_sft),
    ("preference", "preference"): (("chosen", "rejected"), ("prompt",), _from_preference),
    ("alpaca", "preference"): (("instruction", "chosen", "rejected"), ("input", "system", "history"),
                               _from_alpaca_preference),
    ("sharegpt", "preference"): (("conversations", "chosen", "rejected"), ("system",), _from_sharegpt_preference),
    ("hh", "preference"): (("chosen", "rejected"), (), _from_hh_preference),
    ("ranked", "preference"): (("prompt", "responses"), (), _from_ranked),
    # Prompts for PPO rollouts: the prompt part of any format that has one.
    ("prompt", "prompt"): (("prompt",), (), _from_prompt),
    ("prompt_completion", "prompt"): (("prompt",), (), _from_prompt),
    ("preference", "prompt"): (("prompt",), (), _from_prompt),
    ("ranked", "prompt"): (("prompt",), (), _from_prompt),
    ("alpaca", "prompt"): (("instruction",), ("input", "system", "history"), _from_alpaca_prompt),
    # `rlhf label`: a prompt and the responses to compare
    ("candidates", "candidates"): (("prompt", "responses"), (), _from_candidates),
    # KTO: prompt + completion + a thumbs-up/down label...
    ("prompt_completion", "unpaired"): (("prompt", "completion", "label"), (), _from_unpaired),
}  # fmt: skip
# ...or any preference format, each pair unpaired into a desirable and an undesirable row (`unpair`).
_FORMATS.update({(fmt, "unpaired"): (needs, optional, _prompted(convert))
                 for (fmt, kind), (needs, optional, convert) in list(_FORMATS.items()) if kind == "preference"})
_KIND_NEEDS = {
    "sft": "an SFT dataset needs text, prompt+completion, messages, conversations (sharegpt), "
    "instruction+output (alpaca) or chosen holding an HH transcript (hh)",
    "preference": "a preference dataset needs chosen+rejected (optionally prompt), "
    "conversations+chosen+rejected (sharegpt) or instruction+chosen+rejected (alpaca); "
    "chosen+rejected holding HH transcripts are read as hh; two responses and a label column need a winner "
    "section, a prompt with ranked responses a ranking section",
    "prompt": "a prompt dataset needs prompt (text or messages) or instruction (alpaca); map another column "
    "with columns, e.g. {prompt: question}, or build it with prompt_template",
    "candidates": "candidates to label need prompt (text or messages) + responses (a list of two or more strings, "
    "or of mappings with a text); map other names with columns, e.g. {responses: outputs}",
    "unpaired": "unpaired (KTO) data needs prompt+completion+label (label: true/false, 1/0 or yes/no), or "
    "preference pairs in any format train-rm reads (chosen+rejected, optionally prompt; sharegpt; alpaca; hh; a "
    "winner or ranking section), each pair read as a desirable and an undesirable row",
}


# ---------------------------------------------------------------- reading the source's layout


def _root(path: str, columns: list[str] | set[str]) -> str:
    """The column a path starts in; a column whose own name contains dots is taken whole."""
    return path if path in columns else path.split(".")[0]


def _lookup(row: Row, path: str, used_by: str) -> Any:
    """The value at `path`: a column, or a dotted path into nested data (`meta.source`, `instances.0.input`).

    Numbers index lists. A missing key, a short list or a null value is an error naming `used_by` and the path.
    """
    if path in row:
        parts, value, walked = [], row[path], path
    else:
        parts, value, walked = path.split("."), row, ""
    for part in parts:
        if isinstance(value, dict):
            if value.get(part) is None:
                raise _RowError(f"{used_by} {path!r} is missing: {walked!r} has no value for {part!r}"
                                if walked else f"{used_by} {path!r} is missing: column {part!r} is empty")  # fmt: skip
            value = value[part]
        elif isinstance(value, list):
            if not part.isdigit():
                raise _RowError(f"{used_by} {path!r}: {walked!r} is a list; index it with a number, e.g. {walked}.0")
            if int(part) >= len(value):
                size = f"has {_plural(len(value), 'item')}, so no item {part}" if value else "is an empty list"
                raise _RowError(f"{used_by} {path!r} is missing: {walked!r} {size}")
            value = value[int(part)]
        else:
            raise _RowError(f"{used_by} {path!r} is missing: {walked!r} is {_describe(value)}, not a mapping or a list")
        walked = f"{walked}.{part}" if walked else part
    if value is None:
        raise _RowError(f"{used_by} {path!r} is missing (null)")
    return value


# A template field `{path}`, an escaped brace `{{` / `}}`, or a stray brace (an error).
_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}\n]*)\}|[{}]")
# Paragraphs of a template are separated by blank lines.
_PARAGRAPH_BREAK = re.compile(r"(\n{2,})")


def _fields_in(text: str) -> list[str]:
    """The field paths named in `text`, in order; ValueError for a stray brace or an empty field."""
    fields = []
    for match in _TEMPLATE_TOKEN.finditer(text):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            raise ValueError(f"unmatched {token!r} at character {match.start() + 1}; write {token * 2} for a literal "
                             "brace")  # fmt: skip
        name = match.group(1).strip()
        if not name:
            raise ValueError("'{}' names no field; write a column or path inside the braces, e.g. {instruction}")
        fields.append(name)
    return fields


def template_fields(template: str) -> list[str]:
    """The field paths a `prompt_template` names, in order; ValueError says what is malformed."""
    fields = _fields_in(template)
    if not fields:
        raise ValueError("it names no field; write columns or paths in braces, e.g. '{instruction}\\n\\n{input}'")
    return fields


def _template_paragraphs(template: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(separator before it, paragraph, its fields) for each blank-line-separated paragraph of a template."""
    pieces = _PARAGRAPH_BREAK.split(template)
    separators = ["", *pieces[1::2]]
    return tuple((separator, paragraph, tuple(_fields_in(paragraph)))
                 for separator, paragraph in zip(separators, pieces[0::2]))  # fmt: skip


def _template_value(row: Row, path: str) -> str:
    value = _lookup(row, path, "prompt_template field")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise _RowError(f"prompt_template field {path!r} must be text or a number, got {_describe(value)}")


def _fill_template(paragraphs: tuple[tuple[str, str, tuple[str, ...]], ...], row: Row) -> str:
    """The prompt from a parsed `prompt_template`: a paragraph whose every field is blank is left out whole.

    So `"{instruction}\\n\\n{input}"` with an empty input is just the instruction, with no dangling blank line.
    """
    out: list[str] = []
    for separator, paragraph, names in paragraphs:
        values = {name: _template_value(row, name) for name in names}
        if names and not any(value.strip() for value in values.values()):
            continue
        filled = _TEMPLATE_TOKEN.sub(
            lambda match: {"{{": "{", "}}": "}"}.get(match.group(0)) or values[match.group(1).strip()], paragraph
        )
        out.append((separator if out else "") + filled)
    text = "".join(out)
    if not text.strip():
        raise _RowError("prompt_template gives an empty prompt (every field it names is empty)")
    return text


def normalize_label(value: Any) -> float | str | None:
    """A label value as compared with `winner`'s lists: numbers and numeric strings as floats ("1", 1, 1.0 agree),
    other strings stripped; null and NaN are None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return None if math.isnan(number) else number


def _show_values(values: list) -> str:
    return " or ".join("null" if value is None else repr(value) if isinstance(value, str) else str(value)
                       for value in values)  # fmt: skip


def _winner_labels(winner: WinnerSpec) -> dict[float | str | None, str]:
    """Each declared label value, normalized, -> "first", "second", "tie" or "skip" (built once per load)."""
    return {normalize_label(value): outcome for outcome in ("first", "second", "tie", "skip")
            for value in getattr(winner, outcome)}  # fmt: skip


def _pick_winner(row: Row, winner: WinnerSpec, labels: dict[float | str | None, str]) -> Row:
    """`chosen` and `rejected` from two response columns and a label saying which won (`labels` from
    `_winner_labels`); ties and skipped labels raise `_Skip`, any other label is an error."""
    label = row.get(winner.column) if winner.column in row else _lookup(row, winner.column, "winner.column")
    first, second = (_lookup(row, path, "winner.responses") for path in winner.responses)
    outcome = labels.get(normalize_label(label))
    if outcome == "first":
        return {"chosen": first, "rejected": second}
    if outcome == "second":
        return {"chosen": second, "rejected": first}
    shown = "null" if label is None else repr(label)
    if outcome == "tie":
        raise _Skip(TIE, f"label {shown} in {winner.column!r} is a tie")
    if outcome == "skip":
        raise _Skip(SKIPPED_LABEL, f"label {shown} in {winner.column!r} is listed in winner.skip")
    declared = "; ".join(f"{name} {_show_values(values)}" for name, values in
                         (("first", winner.first), ("second", winner.second), ("tie", winner.tie)) if values)
    raise _RowError(
        f"label {shown} in column {winner.column!r} is none of the values winner declares ({declared}); list it "
        "under winner.skip to leave such rows out"
    )  # fmt: skip


def _rank_value(value: Any, label: str) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise _RowError(f"{label} must be a number, got {value!r:.40}")


def _ranked_responses(row: Row, ranking: RankingSpec) -> list[dict[str, Any]]:
    """Each response as `{"text", "rank"}` with lower rank = better (scores are negated when higher is better);
    a response without a rank keeps `rank: None`."""
    responses = _lookup(row, ranking.responses, "ranking.responses")
    if not isinstance(responses, list):
        raise _RowError(f"ranking.responses {ranking.responses!r} must be a list of responses, got "
                        f"{_describe(responses)}")  # fmt: skip
    ranks = None
    if ranking.rank_column is not None:
        ranks = _lookup(row, ranking.rank_column, "ranking.rank_column")
        if not isinstance(ranks, list) or len(ranks) != len(responses):
            got = _plural(len(ranks), "value") if isinstance(ranks, list) else _describe(ranks)
            raise _RowError(f"ranking.rank_column {ranking.rank_column!r} must list one rank per response "
                            f"({len(responses)}), got {got}")  # fmt: skip
    out = []
    for n, item in enumerate(responses, 1):
        label = f"{ranking.responses!r} response {n}"
        if isinstance(item, dict):
            text = item.get(ranking.text)
            rank = ranks[n - 1] if ranks is not None else item.get(ranking.rank)
            where_rank = f"{label} {ranking.rank!r}" if ranks is None else f"{ranking.rank_column!r} value {n}"
        elif isinstance(item, str):
            if ranks is None:
                raise _RowError(f"{label} is a plain string; name the list of its ranks with ranking.rank_column")
            text, rank, where_rank = item, ranks[n - 1], f"{ranking.rank_column!r} value {n}"
        else:
            raise _RowError(f"{label} must be a string or a mapping with {ranking.text!r}, got {_describe(item)}")
        if not isinstance(text, str) or not text.strip():
            raise _RowError(f"{label} needs a non-empty string {ranking.text!r}, got {_describe(text)}")
        value = _rank_value(rank, where_rank)
        if value is not None and ranking.better == "higher":
            value = -value
        out.append({"text": text, "rank": value})
    return out


@dataclass(frozen=True)
class _Plan:
    """How to read one source's rows: what `_prepare` does to each before the format's converter."""

    columns: dict[str, str]  # name the format reads -> source column or dotted path
    template: tuple[tuple[str, str, tuple[str, ...]], ...] | None  # parsed prompt_template
    winner: WinnerSpec | None
    ranking: RankingSpec | None
    hidden: frozenset[str]  # source columns read by the above (and names they replace): not passed on as they are
    winner_labels: dict[float | str | None, str]  # from `_winner_labels`, empty without a winner

    def targets(self) -> list[str]:
        """The names the layout keys make, in a fixed order."""
        names = list(self.columns)
        if self.template is not None:
            names.append("prompt")
        if self.winner is not None:
            names += ["chosen", "rejected"]
        if self.ranking is not None:
            names.append("responses")
        return names

    def sources(self, name: str) -> list[str]:
        """The source paths the name `name` is made from (empty for a column passed on as it is)."""
        if name in self.columns:
            return [self.columns[name]]
        if name == "prompt" and self.template is not None:
            return [field for _, _, fields in self.template for field in fields]
        if name in ("chosen", "rejected") and self.winner is not None:
            return [self.winner.column, *self.winner.responses]
        if name == "responses" and self.ranking is not None:
            return [self.ranking.responses] + ([self.ranking.rank_column] if self.ranking.rank_column else [])
        return []


def _prepare(row: Row, plan: _Plan) -> Row:
    """The row under the names the format reads: mapped columns and paths, the templated prompt, the winner's
    chosen/rejected, the ranked responses; other columns pass through."""
    out = {key: value for key, value in row.items() if key not in plan.hidden}
    for name, path in plan.columns.items():
        # A plain column keeps its value even when empty: the format's own check then names the problem.
        out[name] = row[path] if path in row else _lookup(row, path, f"columns.{name}")
    if plan.template is not None:
        out["prompt"] = _fill_template(plan.template, row)
    if plan.winner is not None:
        out.update(_pick_winner(row, plan.winner, plan.winner_labels))
    if plan.ranking is not None:
        out["responses"] = _ranked_responses(row, plan.ranking)
    return out


# ---------------------------------------------------------------- the report


@dataclass
class DataReport:
    """What loading one data source did: format, columns, and rows read, kept and dropped (JSON-able fields)."""

    what: str  # the recipe key, e.g. "data.train"
    origin: str  # the local path, or "hub dataset 'name'"
    kind: str  # sft | preference | prompt
    format: str  # the format the rows were read as
    detected: bool  # True when format was auto-detected
    columns: dict[str, str] = field(default_factory=dict)  # name the format reads -> where it comes from
    unused_columns: list[str] = field(default_factory=list)  # source columns nothing reads
    rows_in_source: int = 0  # before `limit`
    rows_read: int = 0  # after `limit`
    rows_kept: int = 0  # examples handed on (for format ranked: preference pairs)
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count; the reason names what was counted
    notes: list[str] = field(default_factory=list)  # other things the loader did that the user should know

    def summary(self) -> str:
        """One line: the format, and rows read, kept and dropped."""
        how = "detected" if self.detected else "as set"
        limit = f" (limit; {self.rows_in_source} in the source)" if self.rows_read < self.rows_in_source else ""
        dropped = f"; dropped {_counted(self.dropped)}" if self.dropped else ""
        return (f"{self.what} ({self.origin}): format {self.format} ({how}); {_plural(self.rows_read, 'row')} read"
                f"{limit}, {_plural(self.rows_kept, self._kept_unit)} kept{dropped}.")  # fmt: skip

    def notices(self) -> list[str]:
        """The lines worth printing on every load: drops, unused columns, notes (none when all is plain)."""
        lines = []
        if self.dropped:
            lines.append(f"Warning: {self.what}: dropped {_counted(self.dropped)}; "
                         f"{_plural(self.rows_kept, self._kept_unit)} kept of {_plural(self.rows_read, 'row')} read.")
        if self.unused_columns:
            lines.append(f"Note: {self.what}: columns not used: {', '.join(self.unused_columns)}.")
        lines += [f"Note: {self.what}: {note}" for note in self.notes]
        return lines

    def lines(self) -> list[str]:
        """The human one-liners: the summary, then the notices."""
        return [self.summary(), *self.notices()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def _kept_unit(self) -> str:
        return "pair" if self.format == "ranked" and self.kind == "preference" else "row"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _counted(dropped: dict[str, int]) -> str:
    """"3 rows labelled a tie, 1 pair with ...": each reason after its count, its first word singular for 1."""
    parts = []
    for reason, count in dropped.items():
        noun, _, rest = reason.partition(" ")
        parts.append(f"{count} {noun.removesuffix('s') if count == 1 else noun} {rest}")
    return ", ".join(parts)


@dataclass
class _Counts:
    """Drops counted while rows are converted, and the first one (for the error when nothing is left)."""

    dropped: dict[str, int] = field(default_factory=dict)
    first: tuple[int, str] | None = None

    def add(self, skip: _Skip, index: int) -> None:
        self.dropped[skip.reason] = self.dropped.get(skip.reason, 0) + 1
        if self.first is None:
            self.first = (index, skip.detail)


# ---------------------------------------------------------------- loading


def load_data(source: DataSource, kind: Kind, *, what: str = "data.train") -> datasets.Dataset:
    """Load `source` and return it in TRL's format for `kind` (sft, preference, prompt or unpaired), canonical columns
    only. Rows dropped on purpose, unused columns and notes are printed on stderr (see `load_data_with_report`)."""
    dataset, report = load_data_with_report(source, kind, what=what)
    _print_notices(report.notices())
    return dataset


def load_data_with_report(
    source: DataSource, kind: Kind, *, what: str = "data.train"
) -> tuple[datasets.Dataset, DataReport]:
    """`load_data` without printing, with a `DataReport` of the format, columns and rows read, kept and dropped.

    Row numbers in errors count from 1 over the rows read (over all files, in name order, for a directory).
    """
    origin = source.path if source.path is not None else f"hub dataset {source.name!r}"
    where = f"{what} ({origin})"
    ds = _load_local(Path(source.path), where, what) if source.path is not None else _load_hub(source, what)
    rows_in_source = len(ds)
    if source.limit is not None and source.limit < len(ds):
        ds = ds.select(range(source.limit))
    if len(ds) == 0:
        raise UserError(f"{where} has no rows.")
    raw_columns = list(ds.column_names)
    notes: list[str] = []
    plan = _make_plan(source, kind, raw_columns, where, what, notes)
    plan = _self_instruct_columns(ds, plan, source, kind, what, notes)
    visible = _visible_columns(raw_columns, plan)

    detected = source.format == "auto"
    fmt = _detect_format(ds, plan, visible, kind, where, what) if detected else source.format
    if (fmt, kind) not in _FORMATS:
        fitting = [name for name, k in _FORMATS if k == kind]
        needs = {"sft": "SFT data", "preference": "preference pairs (chosen/rejected)", "prompt": "prompts",
                 "unpaired": "unpaired rows (prompt + completion + label) or preference pairs",
                 "candidates": "a prompt and a list of responses"}[kind]
        raise UserError(
            f"{where}: format {fmt!r} does not fit this stage, which needs {needs}; "
            f"use one of the formats auto, {', '.join(fitting)}."
        )
    required, optional, convert = _FORMATS[(fmt, kind)]
    missing = [column for column in required if column not in visible]
    if missing:
        raise UserError(
            f"{where}: format {fmt!r} needs the columns {'+'.join(required)} for {kind} data; missing: "
            f"{', '.join(missing)}; columns found: [{', '.join(visible)}]; map them with {what}.columns."
        )
    reads = [name for name in (*required, *optional) if name in visible]
    if plan.template is not None and "prompt" not in reads:
        raise UserError(
            f"{where}: {what}.prompt_template builds a prompt, but format {fmt!r} reads no prompt column; use format "
            "prompt_completion, preference or ranked, or leave format: auto."
        )

    kwargs: dict[str, Any] = {"plan": plan, "convert": convert, "kind": kind, "where": where}
    # Every row must have the first kept row's shape (text vs messages), or TRL would see mixed columns.
    kwargs["expected"], kwargs["expected_row"] = _first_kept_shape(ds, kwargs)
    counts = _Counts()
    converted = ds.map(
        _convert_batch,
        batched=True,  # a row at a time costs about twice as long in datasets' own overhead
        with_indices=True,
        fn_kwargs={**kwargs, "counts": counts},
        remove_columns=raw_columns,
        # The cache fingerprint would not notice changes to the converters, so always convert afresh.
        load_from_cache_file=False,
        desc=f"Reading {what}",
    )
    # map keeps a replaced column (e.g. chosen) where it was and appends new ones; put them in TRL's order.
    dataset = converted.select_columns(list(kwargs["expected"]))
    if kind == "unpaired":
        dataset = _unpaired_rows(dataset, fmt, notes)
        _check_both_labels(dataset, where, what)
    sources, unused = _columns_read(plan, reads, raw_columns)
    report = DataReport(
        what=what, origin=origin, kind=kind, format=fmt, detected=detected, columns=sources,
        unused_columns=unused, rows_in_source=rows_in_source, rows_read=len(ds), rows_kept=len(dataset),
        dropped=counts.dropped, notes=notes,
    )  # fmt: skip
    return dataset, report


def _unpaired_rows(dataset: datasets.Dataset, fmt: str, notes: list[str]) -> datasets.Dataset:
    """Unpaired rows as they are, or preference pairs unpaired (`unpair`), said in one note with the counts."""
    import datasets

    if "label" in dataset.column_names:
        if dataset.features["label"] != datasets.Value("bool"):  # map keeps the source column's type (JSON when mixed)
            labels = dataset["label"]
            dataset = dataset.remove_columns("label").add_column("label", [bool(label) for label in labels])
        return dataset
    rows = unpair(dataset.to_list())
    repeats = 2 * len(dataset) - len(rows)
    kept_once = (f"; {_plural(repeats, 'repeated best response')} of a ranking kept once as desirable"
                 if repeats else "")  # fmt: skip
    notes.append(f"read {_plural(len(dataset), 'preference pair')} (format {fmt}) as "
                 f"{_plural(len(rows), 'unpaired row')} for KTO: each pair's chosen response labelled desirable "
                 f"(true), its rejected one undesirable (false){kept_once}.")  # fmt: skip
    return datasets.Dataset.from_list(rows)


def _check_both_labels(dataset: datasets.Dataset, where: str, what: str) -> None:
    """KTO's loss is a desirable term and an undesirable term around a shared reference point: data of one label
    trains only half of it, and no class weight can balance what is not there."""
    desirable = sum(dataset["label"])
    if 0 < desirable < len(dataset):
        return
    label = "desirable (true)" if desirable else "undesirable (false)"
    raise UserError(f"{where}: all {_plural(len(dataset), 'row')} are labelled {label}; KTO learns from thumbs-up "
                    f"AND thumbs-down rows, so it needs at least one row of each label. Check the label column (or "
                    f"{what}.columns.label), or add rows with the other label.")  # fmt: skip


def _convert_batch(batch: dict[str, list], indices: list[int], **kwargs: Any) -> dict[str, list]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = [item for row, index in zip(rows, indices) for item in _convert_row(row, index, **kwargs)]
    return {key: [item[key] for item in out] for key in kwargs["expected"]}


def _convert_row(
    row: Row,
    index: int,
    *,
    plan: _Plan,
    convert: Callable[[Row], Any],
    kind: str,
    where: str,
    expected: dict | None,
    expected_row: int = 1,
    counts: _Counts,
) -> list[Row]:
    """The rows one source row gives (none when it is dropped, several for a ranking), drops counted in `counts`.

    The one place that turns a row problem into a UserError naming the data and the row.
    """
    kept = []
    try:
        result = convert(_prepare(row, plan))
        for item in result if isinstance(result, list) else [result]:
            if isinstance(item, _Skip):
                counts.add(item, index)
            elif kind in ("preference", "unpaired") and "chosen" in item and item["chosen"] == item["rejected"]:
                counts.add(_Skip(IDENTICAL, "'chosen' and 'rejected' are identical"), index)
            else:
                for key, style in _shape(item).items():
                    if expected is not None and style != expected[key]:
                        raise _RowError(f"field {key!r} holds {style} here but {expected[key]} in row {expected_row}")
                kept.append(item)
    except _Skip as skip:
        counts.add(skip, index)
    except _RowError as exc:
        raise UserError(f"{where}, row {index + 1}: {exc}.") from None
    return kept


def _first_kept_shape(ds: datasets.Dataset, kwargs: dict[str, Any]) -> tuple[dict[str, str], int]:
    """The shape of the first row that is kept, and its row number; if no row is, the error names the first dropped
    one."""
    scratch = _Counts()
    for index, row in enumerate(ds):
        kept = _convert_row(row, index, expected=None, counts=scratch, **kwargs)
        if kept:
            return _shape(kept[0]), index + 1
    first_index, detail = scratch.first or (0, "nothing came of it")
    dropped = _counted(scratch.dropped)
    raise UserError(
        f"{kwargs['where']}, row {first_index + 1}: {detail}; every row read was dropped ({dropped}), so nothing is "
        "left to use."
    )


def _shape(row: Row) -> dict[str, str]:
    return {key: "messages" if isinstance(value, list) else "text" for key, value in row.items()}


def _print_notices(lines: list[str]) -> None:
    if not lines:
        return
    from rlhf_cli.console import make_console
    from rich.markup import escape

    console = make_console(stderr=True, soft_wrap=True)
    for line in lines:
        label, _, rest = line.partition(": ")
        color = "yellow" if label == "Warning" else "cyan"
        console.print(f"[{color}]{label}:[/] {escape(rest)}", highlight=False)


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
        if _builder_for(file) in ("json", "csv"):
            _check_text_file(file, what)
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


def _check_text_file(file: Path, what: str) -> None:
    """A text file must decode as UTF-8 to its end, and a .gz must be complete: pyarrow would otherwise accept bad
    bytes and fail on the first row that holds them, and gzip reports a cut-short file as a bare EOFError."""
    import codecs
    import zlib

    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if file.name.lower().endswith(".gz") else open
    offset, line = 0, 1
    try:
        with opener(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    position = offset + exc.start
                    line += chunk[: exc.start].count(b"\n")
                    raise UserError(
                        f"{what} ({file}) is not UTF-8 text: byte 0x{chunk[exc.start]:02x} at offset {position} "
                        f"(line {line}) cannot be decoded. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                    ) from None
                offset += len(chunk)
                line += chunk.count(b"\n")
            decoder.decode(b"", final=True)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UserError(f"{what} ({file}): the compressed file is truncated or damaged ({exc}); download or "
                        "compress it again.") from None  # fmt: skip
    except UnicodeDecodeError:
        raise UserError(f"{what} ({file}) is not UTF-8 text: it ends in the middle of a character.") from None


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


# ---------------------------------------------------------------- planning: layout keys, columns, detection


def _make_plan(source: DataSource, kind: Kind, raw_columns: list[str], where: str, what: str,
               notes: list[str]) -> _Plan:  # fmt: skip
    """Check that every column and path the layout keys name starts in a column of the data, and plan `_prepare`."""
    found = f"columns found: [{', '.join(raw_columns)}]"

    def check(path: str, key: str, names: str) -> None:
        root = _root(path, raw_columns)
        if root in raw_columns:
            return
        if root == path:
            raise UserError(f"{where}: {what}.{key} {names} column {path!r}, which is not in the data; {found}.")
        raise UserError(f"{where}: {what}.{key} {names} {path!r}, but the data has no column {root!r}; {found}.")

    for name, path in source.columns.items():
        check(path, "columns", f"maps {name!r} to")
    if len(set(source.columns.values())) < len(source.columns):
        raise UserError(f"{where}: {what}.columns maps several names to the same column; map each column once.")
    template = None
    if source.prompt_template is not None:
        template = _template_paragraphs(source.prompt_template)
        for path in template_fields(source.prompt_template):
            check(path, "prompt_template", "names")
    winner, ranking = source.winner, source.ranking
    if winner is not None and kind == "sft":
        raise UserError(
            f"{where}: {what}.winner makes preference pairs, but this stage reads SFT data; remove winner, or map "
            f"the response to learn from with {what}.columns."
        )
    if kind == "prompt" and (winner or ranking):
        key = "winner" if winner else "ranking"
        notes.append(f"{key} is not used: only the prompt is read here.")
        winner = ranking = None
    if winner is not None:
        check(winner.column, "winner.column", "names")
        for path in winner.responses:
            check(path, "winner.responses", "names")
    if ranking is not None:
        check(ranking.responses, "ranking.responses", "names")
        if ranking.rank_column is not None:
            check(ranking.rank_column, "ranking.rank_column", "names")
    return _planned(dict(source.columns), template, winner, ranking, raw_columns)


def _planned(columns: dict[str, str], template: Any, winner: Any, ranking: Any, raw_columns: list[str]) -> _Plan:
    labels = _winner_labels(winner) if winner is not None else {}
    plan = _Plan(columns, template, winner, ranking, hidden=frozenset(), winner_labels=labels)
    # A source column read by a layout key no longer shows under its own name (as with a rename), so detection
    # sees only what the format will read; a name the layout produces replaces a source column of that name.
    hidden = {_root(path, raw_columns) for name in plan.targets() for path in plan.sources(name)}
    hidden |= set(plan.targets())
    return _Plan(columns, template, winner, ranking, hidden=frozenset(hidden), winner_labels=labels)


def _visible_columns(raw_columns: list[str], plan: _Plan) -> list[str]:
    """The column names the format sees: source columns the layout keys do not read, then the names they make."""
    return [column for column in raw_columns if column not in plan.hidden] + plan.targets()


def _self_instruct_columns(ds: datasets.Dataset, plan: _Plan, source: DataSource, kind: Kind, what: str,
                           notes: list[str]) -> _Plan:  # fmt: skip
    """Self-Instruct rows (`instruction` + `instances: [{input, output}]`) read as alpaca from their first instance,
    so the nested input is not lost; said in a note, with how many rows hold more instances than the one read."""
    visible = set(_visible_columns(list(ds.column_names), plan))
    if (source.format not in ("auto", "alpaca") or kind in ("preference", "unpaired")
            or not {"instruction", "instances"} <= visible
            or {"input", "output"} & visible):  # fmt: skip
        return plan
    extra = {"input": "instances.0.input"} | ({"output": "instances.0.output"} if kind == "sft" else {})
    more = sum(1 for instances in ds["instances"] if isinstance(instances, list) and len(instances) > 1)
    notes.append(
        f"read {' and '.join(f'{name} from {path}' for name, path in extra.items())} (the Self-Instruct layout)"
        + (f"; {more} rows hold more than one instance, and only the first is read" if more else "")
        + f"; map other paths with {what}.columns."
    )
    return _planned({**plan.columns, **extra}, plan.template, plan.winner, plan.ranking, list(ds.column_names))


def _columns_read(plan: _Plan, reads: list[str], raw_columns: list[str]) -> tuple[dict[str, str], list[str]]:
    """Where each name the format reads comes from, and the source columns nothing reads."""
    sources: dict[str, str] = {}
    used: set[str] = set()
    for name in reads:
        paths = plan.sources(name)
        used |= {_root(path, raw_columns) for path in paths} if paths else {name}
        if name in plan.columns:
            sources[name] = plan.columns[name]
        elif name == "prompt" and plan.template is not None:
            sources[name] = "prompt_template"
        elif name in ("chosen", "rejected") and plan.winner is not None:
            first, second = plan.winner.responses
            sources[name] = f"{first} or {second}, by winner column {plan.winner.column}"
        elif name == "responses" and plan.ranking is not None:
            sources[name] = f"ranking of {plan.ranking.responses}"
        else:
            sources[name] = name
    return sources, [column for column in raw_columns if column not in used]


def _looks_like_hh(value: Any) -> bool:
    """An Anthropic HH transcript: it opens with a Human turn (a transcript lacking its Assistant turn is still one,
    and the hh reader says what is wrong with it) or holds both turn markers."""
    return isinstance(value, str) and (
        value.startswith("\n\nHuman:") or ("\n\nHuman:" in value and "\n\nAssistant:" in value)
    )


def _first_prepared(ds: datasets.Dataset, plan: _Plan, where: str) -> Row:
    """The first row that is not dropped, as the format will read it (detection looks at its values)."""
    for index, row in enumerate(ds):
        try:
            return _prepare(row, plan)
        except _Skip:
            continue
        except _RowError as exc:
            raise UserError(f"{where}, row {index + 1}: {exc}.") from None
    return {}


def _detect_format(ds: datasets.Dataset, plan: _Plan, visible: list[str], kind: Kind, where: str, what: str) -> str:
    """Guess the format from the column names (and, for HH, the first `chosen` value)."""
    columns = set(visible)
    if plan.ranking is not None:
        return "ranked"
    hh = "chosen" in columns and _looks_like_hh(_first_prepared(ds, plan, where).get("chosen"))
    if kind == "candidates" and {"prompt", "responses"} <= columns:
        return "candidates"
    if kind == "prompt":
        if "prompt" in columns:
            return "prompt"
        if "instruction" in columns:
            return "alpaca"
    elif kind == "unpaired" and {"prompt", "completion"} <= columns and "chosen" not in columns:
        if "label" in columns:
            return "prompt_completion"
        raise UserError(f"{where}: prompt and completion but no label column; KTO needs each completion labelled "
                        f"desirable or not (true/false, 1/0 or yes/no): map the column that says so with "
                        f"{what}.columns, e.g. {{label: thumbs_up}}; columns found: [{', '.join(visible)}].")
    elif kind in ("preference", "unpaired"):
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
        f"{where}: cannot tell the format from columns [{', '.join(visible)}]; {_KIND_NEEDS[kind]}; "
        f"set {what}.format or {what}.columns."
    )


# ---------------------------------------------------------------- holding out evaluation rows

HOLDOUT_MIN_ROWS = 8  # a stage's default hold-out is at least this many rows...
HOLDOUT_MAX_ROWS = 1000  # ...and at most this many: enough to tell accuracy within about +-3 points (95%)
HOLDOUT_MIN_DATA = 5 * HOLDOUT_MIN_ROWS  # with fewer rows than this, a stage holds nothing out by default


def eval_split_size(rows: int, split: float | int, *, what: str = "data.train") -> int:
    """How many of `rows` rows `data.eval_split` holds out: a fraction (0, 0.5] rounds up (at least one row), an int
    is a number of rows. A UserError when that leaves no evaluation row or no training row."""
    if isinstance(split, float):
        size = math.ceil(round(split * rows, 6))  # round first: 0.05 * 60 is 3.0000000000000004
        asked = f"data.eval_split: {split:g} of {rows} rows"
    else:
        size = split
        asked = f"data.eval_split: {split} rows of {rows}"
    if size < 1:
        raise UserError(f"{asked} holds out no row; give a larger data.eval_split, or 0 to hold out nothing.")
    if rows - size < 1:
        raise UserError(f"{asked} leaves no row of {what} to train on; give a smaller data.eval_split "
                        f"(at most {rows - 1} rows), or the evaluation data as data.eval.")  # fmt: skip
    return size


def default_holdout_size(rows: int, fraction: float) -> int:
    """The rows a stage holds out when the recipe gives no evaluation data: `fraction` of them, rounded up, at least
    HOLDOUT_MIN_ROWS and at most HOLDOUT_MAX_ROWS; 0 (nothing) when there are fewer than HOLDOUT_MIN_DATA rows."""
    if rows < HOLDOUT_MIN_DATA:
        return 0
    return min(HOLDOUT_MAX_ROWS, max(HOLDOUT_MIN_ROWS, math.ceil(round(fraction * rows, 6))))


def holdout_indices(rows: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows) of `rows` rows, `size` of them held out, both in their original order.

    Pure and deterministic: the held-out rows are `random.Random(seed).sample(range(rows), size)`, so the same seed
    picks the same rows on every machine, in every process and on --resume."""
    import random

    if not 0 <= size <= rows:
        raise ValueError(f"cannot hold out {size} of {rows} rows")
    held = set(random.Random(seed).sample(range(rows), size))
    return [i for i in range(rows) if i not in held], sorted(held)


def split_dataset(dataset: datasets.Dataset, size: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training part, held-out part) of a loaded dataset, by `holdout_indices`."""
    train, held = holdout_indices(len(dataset), size, seed)
    return dataset.select(train), dataset.select(held)
