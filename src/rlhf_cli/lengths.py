"""Examples longer than the token budget: one rule for every stage, applied before the trainer sees the data.

The rule (`data.on_too_long`):

    truncate  (default) keep the END of the prompt and the START of each response, so that prompt + response fits
              `max_length`. When both are long, neither side is cut below half the budget: the prompt keeps
              min(prompt, max(max_length - longest response, max_length // 2)) tokens and every response the rest
              (so each response keeps at least min(its length, max_length - max_length // 2) tokens, never none).
              A prompt alone longer than the budget is cut from the left. A preference pair keeps the same prompt
              tokens for both responses, so the reward model compares the responses on one context. SFT data
              without a prompt (`text` rows, or a conversation that does not end with an assistant turn) keeps
              its start. PPO prompts keep their end.
    drop      remove every too-long row, and count it.
    error     stop with a UserError naming how many rows are too long and the first of them.

Why the trainer sees exactly the counted rows: the rows are tokenized HERE, the way TRL 1.16 would tokenize them
(`processing_class(text=...)` with EOS appended for text, `apply_chat_template(..., tokenize=True)` for messages;
the prompt/response boundary is where the rendered prompt stops being a prefix of the rendered sequence, as in
TRL), cut, and handed to the trainer in the columns TRL accepts as already processed:

    RewardTrainer   `chosen_ids` / `rejected_ids`: `_prepare_dataset` skips its own tokenization; its filter on
                    `max_length` (which would DROP longer pairs silently) still runs, but every pair already fits.
    SFTTrainer      `input_ids` (+ `completion_mask` for prompt/completion data, + `assistant_masks` with
                    `assistant_only_loss`), next to the original columns, so TRL's own defaults (completion-only
                    loss for prompt/completion data) are decided as before. TRL then builds the labels; its
                    truncation to `max_length` and its filter of rows with no trained token change nothing.
    DPO / KTO       `prompt_ids` + the response ids (`chosen_ids` / `rejected_ids`, or `completion_ids` + `label`),
                    which `rlhf_cli.stages.pretokenized` hands to the trainers untouched.

No detokenize/retokenize round trip is involved (that would not reproduce the counted tokens), and
`rlhf_cli.stages.common.train` checks after building the trainer that it holds as many rows as were kept.
`rlhf eval` cuts preference pairs and demonstrations with the same windows (`scoring_split`), and the PPO trainer
takes its prompt ids from `fit_prompts`.

Heavy imports (datasets, trl) stay inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from rlhf_cli.errors import UserError

if TYPE_CHECKING:
    import datasets

OnTooLong = Literal["truncate", "drop", "error"]
PERCENTILES = (50, 90, 95, 99)
WARN_FRACTION = 0.05  # warn when more than this share of the rows is truncated or dropped
COVERAGE = 0.95  # the suggested max_length keeps this share of the rows whole


# ---------------------------------------------------------------- pure rules on token lists


def budget(prompt_length: int, response_lengths: Sequence[int], max_length: int) -> tuple[int, list[int]]:
    """(prompt tokens kept, tokens kept of each response) so that prompt + every response fits `max_length`.

    Nothing is cut when prompt + the longest response fits. Otherwise the prompt keeps
    min(prompt_length, max(max_length - longest, max_length // 2)) tokens (from its end) and each response
    min(its length, max_length - prompt kept) tokens (from its start): a short response costs the prompt only what
    it needs, and when both are long each side keeps half. With no response the prompt keeps its last
    `max_length` tokens.
    """
    if max_length < 1:
        raise ValueError("max_length must be at least 1")
    longest = max(response_lengths, default=0)
    if prompt_length + longest <= max_length:
        return prompt_length, list(response_lengths)
    prompt_keep = min(prompt_length, max(max_length - longest, max_length // 2))
    room = max_length - prompt_keep
    return prompt_keep, [min(length, room) for length in response_lengths]


def windows(lengths: Sequence[int], boundary: int | None, max_length: int) -> list[tuple[int, int]]:
    """(start, stop) of the tokens kept of each sequence; they share their first `boundary` tokens (the prompt).

    `boundary` None: no prompt, every sequence keeps its first `max_length` tokens.
    """
    if boundary is None:
        return [(0, min(length, max_length)) for length in lengths]
    prompt_keep, kept = budget(boundary, [length - boundary for length in lengths], max_length)
    return [(boundary - prompt_keep, boundary + keep) for keep in kept]


def truncate_pair(prompt: list[int], chosen: list[int], rejected: list[int],
                  max_length: int) -> tuple[list[int], list[int]]:  # fmt: skip
    """Token ids of a preference pair as trained on: the prompt's end + each response's start (see `budget`)."""
    prompt_keep, (chosen_keep, rejected_keep) = budget(len(prompt), [len(chosen), len(rejected)], max_length)
    kept = prompt[len(prompt) - prompt_keep :]
    return kept + chosen[:chosen_keep], kept + rejected[:rejected_keep]


def truncate_prompt_completion(prompt: list[int], completion: list[int], max_length: int) -> list[int]:
    """Token ids of an SFT prompt/completion row as trained on: the prompt's end + the completion's start."""
    prompt_keep, (completion_keep,) = budget(len(prompt), [len(completion)], max_length)
    return prompt[len(prompt) - prompt_keep :] + completion[:completion_keep]


def truncate_text(ids: list[int], max_length: int) -> list[int]:
    """A `text` row (no prompt) keeps its first `max_length` tokens."""
    return ids[:max_length]


def truncate_prompt(ids: list[int], max_length: int) -> list[int]:
    """A prompt to answer (PPO) keeps its last `max_length` tokens: the end is what the response follows."""
    return ids[max(0, len(ids) - max_length) :]


def scoring_split(sequences: Sequence[list[int]], boundary: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(query, response) of each sequence cut as in training (`windows`), for scoring by `rlhf eval`.

    Scoring needs at least one query token (the first response token is predicted from it) and one response token:
    when the kept prompt is empty the first kept token becomes the query.
    """
    out = []
    for ids, (start, stop) in zip(sequences, windows([len(s) for s in sequences], boundary, max_length)):
        kept = ids[start:stop]
        cut = min(max(1, boundary - start), len(kept) - 1) if len(kept) > 1 else 0
        out.append((kept[:cut] or kept[:1], kept[cut:] or kept[-1:]))
    return out


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least q% of `values` at or below it."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def length_percentiles(lengths: Sequence[int]) -> dict[str, int]:
    """p50/p90/p95/p99/max of token lengths (nearest rank)."""
    out = {f"p{q}": percentile(lengths, q) for q in PERCENTILES}
    out["max"] = max(lengths, default=0)
    return out


def length_for_coverage(lengths: Sequence[int], fraction: float = COVERAGE) -> int:
    """The smallest max_length that keeps at least `fraction` of the rows unchanged (nearest-rank percentile)."""
    return percentile(lengths, fraction * 100)


# ---------------------------------------------------------------- the report


@dataclass
class LengthReport:
    """What the length rule did to one data set. Lengths are in tokens as the trainer reads them, before any cut
    (a pair counts its longer sequence)."""

    what: str  # "data.train"
    max_length: int
    on_too_long: str
    limit_key: str = "data.max_length"  # the recipe key that set max_length
    rows_in: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    too_long: int = 0  # rows longer than max_length, whatever was done with them
    first_too_long: tuple[int, int] | None = None  # (row number from 1, its length)
    percentiles: dict[str, int] = field(default_factory=dict)
    fits_95: int = 0  # max_length that would keep 95% of the rows whole

    def counts(self, prefix: str = "") -> dict[str, int]:
        """For summary.json and the run summary."""
        return {f"{prefix}rows read": self.rows_in, f"{prefix}rows kept": self.kept,
                f"{prefix}rows truncated": self.truncated, f"{prefix}rows dropped": self.dropped}  # fmt: skip

    @property
    def share_changed(self) -> float:
        return (self.truncated + self.dropped) / self.rows_in if self.rows_in else 0.0

    def lengths_line(self) -> str:
        shown = ", ".join(f"{key} {value}" for key, value in self.percentiles.items())
        return f"token lengths {shown}; {self.limit_key} = {self.fits_95} would keep 95% of rows whole"

    def warning(self) -> str | None:
        """A warning when more than 5% of the rows were truncated or dropped, else None."""
        if self.share_changed <= WARN_FRACTION:
            return None
        done = "truncated" if self.truncated else "dropped"
        changed = self.truncated + self.dropped
        return (f"{self.what}: {changed} of {self.rows_in} rows ({100 * self.share_changed:.1f}%) are longer than "
                f"{self.limit_key} = {self.max_length} tokens and were {done}; {self.lengths_line()}.")  # fmt: skip

    def error_message(self) -> str:
        row, length = self.first_too_long or (0, 0)
        return (
            f"{self.what}: {self.too_long} of {self.rows_in} rows are longer than {self.limit_key} "
            f"({self.max_length} tokens); the first is row {row} ({length} tokens). Raise {self.limit_key} "
            f"({self.fits_95} keeps 95% of the rows whole), or set data.on_too_long to truncate (keep the prompt's "
            "end and each response's start) or drop (leave those rows out)."
        )

    def action(self, kind: str = "preference", text_format: str | None = None) -> str:
        """What `on_too_long` does (or would do) with this data, in one line; `kind` and `text_format` say which
        end of a row is kept."""
        if not self.too_long:
            return f"every row fits {self.limit_key} = {self.max_length}"
        share = f"{self.too_long} of {self.rows_in} rows are longer than {self.limit_key} = {self.max_length}"
        if self.on_too_long == "error":
            row, length = self.first_too_long
            return f"{share}; the run would stop (first: row {row}, {length} tokens)"
        if self.on_too_long == "drop":
            return f"{share}; they are dropped"
        if kind == "prompt":
            return f"{share}; each keeps its last {self.max_length} tokens"
        if kind == "sft" and text_format == "text":
            return f"{share}; each keeps its first {self.max_length} tokens"
        if kind == "sft":
            return (f"{share}; each keeps its prompt's end and its completion's start (a conversation: the end of "
                    "the turns before its last assistant turn, and the start of that turn)")  # fmt: skip
        return f"{share}; each keeps the prompt's end and each response's start"


def warn(report: LengthReport | None) -> None:
    """Print the report's warning on stderr (once, on the main process of a distributed run)."""
    import os

    message = report.warning() if report is not None else None
    if message and os.environ.get("RANK", "0") == "0":
        from rlhf_cli.console import make_console
        from rich.markup import escape

        make_console(stderr=True, soft_wrap=True).print(f"[yellow]Warning:[/] {escape(message)}", highlight=False)


# ---------------------------------------------------------------- tokenizing as TRL does


@dataclass
class Encoded:
    """One row tokenized as its trainer reads it: one or more sequences sharing their first `boundary` tokens."""

    sequences: list[list[int]]
    boundary: int | None  # None: no prompt, keep the start
    masks: list[dict[str, list[int]]] = field(default_factory=list)  # per sequence: per-token columns, cut alike

    @property
    def length(self) -> int:
        return max(len(s) for s in self.sequences)


def common_prefix(one: Sequence[int], other: Sequence[int]) -> int:
    length = 0
    for a, b in zip(one, other):
        if a != b:
            break
        length += 1
    return length


def _chat(tokenizer, messages: list, **kwargs) -> dict[str, list[int]]:
    return dict(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs))


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text=text)["input_ids"])


def _with_eos(text: str, eos: str | None) -> str:
    return text if not eos or text.endswith(eos) else text + eos


def encode_pair(tokenizer, row: dict) -> Encoded:
    """A preference row as TRL's RewardTrainer tokenizes it: prompt + chosen and prompt + rejected through the chat
    template, or as text with EOS appended to each response. The boundary is their shared prompt."""
    prompt = row.get("prompt")
    if isinstance(row["chosen"], list):
        chosen = _chat(tokenizer, (prompt or []) + row["chosen"])["input_ids"]
        rejected = _chat(tokenizer, (prompt or []) + row["rejected"])["input_ids"]
        prompt_ids = _chat(tokenizer, prompt, add_generation_prompt=True)["input_ids"] if prompt else None
    else:
        eos = tokenizer.eos_token
        chosen = _text_ids(tokenizer, (prompt or "") + _with_eos(row["chosen"], eos))
        rejected = _text_ids(tokenizer, (prompt or "") + _with_eos(row["rejected"], eos))
        prompt_ids = _text_ids(tokenizer, prompt) if prompt else None
    boundary = common_prefix(chosen, rejected)
    if prompt_ids is not None:
        boundary = min(boundary, common_prefix(prompt_ids, chosen))
    return Encoded([list(chosen), list(rejected)], boundary)


def encode_sft(tokenizer, row: dict, *, assistant_only_loss: bool = False, chat_template: str | None = None) -> Encoded:
    """An SFT row as TRL's SFTTrainer tokenizes it. prompt/completion rows get TRL's `completion_mask`; with
    `assistant_only_loss` conversations get `assistant_masks` (from `chat_template` when given, as TRL swaps in a
    template with generation markers). The boundary: where the completion (or a conversation's last assistant
    turn) starts; None for text rows."""
    kwargs: dict[str, Any] = {"chat_template": chat_template} if chat_template else {}
    mask_kwargs = {"return_assistant_tokens_mask": True} if assistant_only_loss else {}
    masks: dict[str, list[int]] = {}
    if "text" in row:
        return Encoded([_text_ids(tokenizer, _with_eos(row["text"], tokenizer.eos_token))], None)
    if "messages" in row:
        messages = row["messages"]
        full = _chat(tokenizer, messages, **kwargs, **mask_kwargs)
        if "assistant_masks" in full:
            masks["assistant_masks"] = list(full["assistant_masks"])
        boundary = None
        if len(messages) > 1 and messages[-1]["role"] == "assistant":
            head = _chat(tokenizer, messages[:-1], add_generation_prompt=True, **kwargs)["input_ids"]
            boundary = common_prefix(head, full["input_ids"])
        return Encoded([list(full["input_ids"])], boundary, [masks])
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        prompt_ids = _chat(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        full = _chat(tokenizer, prompt + completion, **kwargs, **mask_kwargs)
        ids = list(full["input_ids"])
        if "assistant_masks" in full:
            masks["assistant_masks"] = list(full["assistant_masks"])
    else:
        prompt_ids = _text_ids(tokenizer, prompt)
        ids = _text_ids(tokenizer, prompt + _with_eos(completion, tokenizer.eos_token))
    boundary = common_prefix(prompt_ids, ids)
    masks["completion_mask"] = [0] * boundary + [1] * (len(ids) - boundary)
    return Encoded([ids], boundary, [masks])


def encode_unpaired(tokenizer, row: dict) -> Encoded:
    """An unpaired (KTO) row as TRL's KTOTrainer tokenizes it: the prompt alone (chat template with the generation
    prompt, or the text) and prompt + completion (the whole conversation, or the text with EOS appended). The
    boundary is where the two stop agreeing, as TRL's `common_prefix_length`."""
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list):
        prompt_ids = _chat(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        ids = _chat(tokenizer, prompt + completion)["input_ids"]
    else:
        prompt_ids = _text_ids(tokenizer, prompt)
        ids = _text_ids(tokenizer, prompt + _with_eos(completion, tokenizer.eos_token))
    return Encoded([list(ids)], common_prefix(prompt_ids, ids))


def encode_prompt(tokenizer, prompt) -> Encoded:
    """A prompt to answer, as the PPO trainer encodes it: the chat template with the generation prompt, or the text
    without special tokens. All of it is prompt: it keeps its end."""
    if isinstance(prompt, list):
        ids = list(_chat(tokenizer, prompt, add_generation_prompt=True)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return Encoded([ids], len(ids))


# ---------------------------------------------------------------- applying the rule to a data set


@dataclass
class Fitted:
    """Rows after the rule: which rows of the input were kept (indices), and their cut encodings."""

    indices: list[int]
    encodings: list[Encoded]
    report: LengthReport


def fit_rows(encodings: Sequence[Encoded], *, max_length: int, on_too_long: str, what: str,
             limit_key: str = "data.max_length", check: bool = True) -> Fitted:  # fmt: skip
    """Apply `on_too_long` to tokenized rows. With `check` (training), the error policy raises the UserError;
    without it (inspection) the report says what would happen and the rows are returned as they are."""
    lengths = [encoded.length for encoded in encodings]
    report = LengthReport(what=what, max_length=max_length, on_too_long=on_too_long, limit_key=limit_key,
                          rows_in=len(encodings), percentiles=length_percentiles(lengths),
                          fits_95=length_for_coverage(lengths))  # fmt: skip
    indices, kept = [], []
    for index, (encoded, length) in enumerate(zip(encodings, lengths)):
        if length > max_length:
            report.too_long += 1
            if report.first_too_long is None:
                report.first_too_long = (index + 1, length)
            if on_too_long == "drop":
                report.dropped += 1
                continue
            if on_too_long == "truncate":
                encoded = _cut(encoded, max_length)
                report.truncated += 1
        indices.append(index)
        kept.append(encoded)
    report.kept = len(kept)
    if check and on_too_long == "error" and report.too_long:
        raise UserError(report.error_message())
    if check and not kept:
        raise UserError(f"{what}: no row is left: all {report.rows_in} are longer than {limit_key} ({max_length} "
                        f"tokens). Raise {limit_key} ({report.fits_95} keeps 95% of them whole) or set "
                        "data.on_too_long to truncate.")  # fmt: skip
    return Fitted(indices, kept, report)


def _cut(encoded: Encoded, max_length: int) -> Encoded:
    spans = windows([len(s) for s in encoded.sequences], encoded.boundary, max_length)
    sequences = [ids[start:stop] for ids, (start, stop) in zip(encoded.sequences, spans)]
    masks = [{key: values[start:stop] for key, values in row.items()}
             for row, (start, stop) in zip(encoded.masks, spans)]  # fmt: skip
    boundary = None if encoded.boundary is None else encoded.boundary - spans[0][0]
    return Encoded(sequences, boundary, masks)


def encode_dataset(dataset: datasets.Dataset, tokenizer, kind: str, *, assistant_only_loss: bool = False,
                   chat_template: str | None = None) -> list[Encoded]:  # fmt: skip
    """Every row of a `load_data` dataset of `kind` (sft, preference, prompt, unpaired), tokenized as its trainer
    reads it."""
    if kind == "preference":
        return [encode_pair(tokenizer, row) for row in dataset]
    if kind == "unpaired":
        return [encode_unpaired(tokenizer, row) for row in dataset]
    if kind == "prompt":
        return [encode_prompt(tokenizer, prompt) for prompt in dataset["prompt"]]
    return [encode_sft(tokenizer, row, assistant_only_loss=assistant_only_loss, chat_template=chat_template)
            for row in dataset]  # fmt: skip


def trainer_dataset(dataset: datasets.Dataset, kind: str, fitted: Fitted, *,
                    split_prompt: bool = False) -> datasets.Dataset:  # fmt: skip
    """The kept rows in the pre-tokenized columns the trainer takes as they are (see the module docstring).

    Preference pairs: whole sequences (`chosen_ids`, `rejected_ids`: the reward model reads each whole), or with
    `split_prompt` (DPO and its relatives, which train on the responses only) `prompt_ids` + the two responses'
    `chosen_ids` / `rejected_ids` next to the original columns."""
    import datasets

    rows = fitted.encodings
    if kind == "preference" and not split_prompt:
        return datasets.Dataset.from_dict({"chosen_ids": [r.sequences[0] for r in rows],
                                           "rejected_ids": [r.sequences[1] for r in rows]})  # fmt: skip
    out = dataset.select(fitted.indices) if len(fitted.indices) < len(dataset) else dataset
    if kind == "unpaired":
        out = out.add_column("prompt_ids", [r.sequences[0][: r.boundary] for r in rows])
        out = out.add_column("completion_ids", [r.sequences[0][r.boundary :] for r in rows])
        return out.select(kl_order(len(out)))
    if kind == "preference":
        columns = {"prompt_ids": [r.sequences[0][: r.boundary] for r in rows],
                   "chosen_ids": [r.sequences[0][r.boundary :] for r in rows],
                   "rejected_ids": [r.sequences[1][r.boundary :] for r in rows]}  # fmt: skip
        for name, values in columns.items():
            out = out.remove_columns(name) if name in out.column_names else out
            out = out.add_column(name, values)
        return out
    out = out.add_column("input_ids", [r.sequences[0] for r in rows])
    if kind == "sft":
        for key in ("completion_mask", "assistant_masks"):
            if rows and rows[0].masks and key in rows[0].masks[0]:
                out = out.add_column(key, [r.masks[0][key] for r in rows])
    return out


def sft_template_for_loss(tokenizer, training: dict) -> str | None:
    """The chat template TRL's SFTTrainer renders with: a training template with generation markers when
    `assistant_only_loss` is on and the tokenizer's own has none, else None (the tokenizer's own)."""
    if not training.get("assistant_only_loss"):
        return None
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if tokenizer.chat_template and has_generation_markers(tokenizer.chat_template):
        return None
    return get_training_chat_template(tokenizer)


def _check_trainable(fitted: Fitted, training: dict, what: str) -> None:
    """TRL drops SFT rows in which no token carries the loss; name such a row instead of losing it."""
    completion_only = training.get("completion_only_loss")
    for index, encoded in zip(fitted.indices, fitted.encodings):
        masks = encoded.masks[0] if encoded.masks else {}
        used = [masks[key] for key in ("assistant_masks",) if key in masks]
        if "completion_mask" in masks and completion_only is not False:
            used.append(masks["completion_mask"])
        if used and not any(all(bits) for bits in zip(*used)):
            raise UserError(f"{what}, row {index + 1}: no token of it is trained on (its completion or assistant "
                            "turn is empty, or the chat template marks no assistant tokens); fix or remove the "
                            "row.")  # fmt: skip


def kl_order(rows: int) -> list[int]:
    """The order unpaired rows reach KTOTrainer: the even rows in place, the odd rows between them rotated by half:
        0, 2h+1, 2, 2h+3, 4, ...   with h = ceil(odd rows / 2), the odd rows taken cyclically
    KTO estimates its KL reference point from each row's prompt with the PREVIOUS row's completion (TRL samples in
    order), which must be a completion to another prompt. Preference pairs unpaired lie side by side (x, y_w),
    (x, y_l): here, from three pairs on, the two answers to one prompt end up at least three places and about half
    the data apart, so no neighbours share a prompt (nor the first and last row of a batch, unless a batch holds
    about half the rows), and desirable and undesirable rows alternate in every batch."""
    evens, odds = list(range(0, rows, 2)), list(range(1, rows, 2))
    shift = (len(odds) + 1) // 2
    odds = odds[shift:] + odds[:shift]
    order = [index for pair in zip(evens, odds) for index in pair]
    return order + evens[len(odds):]


def check_unpaired(encodings: Sequence[Encoded], dataset: datasets.Dataset, what: str) -> None:
    """KTO scores each completion's log-probability GIVEN its prompt: a row needs a prompt token (the first
    completion token is predicted from it) and a completion token of its own. The error quotes the row's prompt,
    since its number counts the rows left after the hold-out (and a pair gives two rows)."""
    for index, encoded in enumerate(encodings, 1):
        if encoded.boundary and len(encoded.sequences[0]) > encoded.boundary:
            continue
        prompt = dataset[index - 1]["prompt"]
        row = f"{what}, row {index} (prompt {_last_text(prompt)!r:.60})"
        if not encoded.boundary:
            raise UserError(f"{row}: no token of the prompt is left once the completion follows it (the tokenizer "
                            "merges the prompt into the completion's first token), so there is no prompt to score "
                            "the completion against; end the prompt with a space or newline, or drop the "
                            "row.")  # fmt: skip
        raise UserError(f"{row}: the completion has no token after the prompt (the chat template renders nothing "
                        "for it), so there is nothing to score; fix or drop the row.")  # fmt: skip


def _last_text(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def check_prompted(encodings: Sequence[Encoded], what: str, command: str = "rlhf dpo") -> None:
    """DPO-style losses compare the policy's and the reference's log-probabilities of each response GIVEN its
    prompt: a pair whose responses share no beginning (no prompt column, no common start) has no prompt, and a
    response with no token of its own has nothing to score."""
    for index, encoded in enumerate(encodings, 1):
        if not encoded.boundary:
            raise UserError(f"{what}, row {index}: no prompt. {command} trains on each response given its prompt, "
                            "and this pair has no prompt column and its two responses share no beginning. Add a "
                            "prompt column (or map one with data.train.columns), or drop the row.")  # fmt: skip
        for name, ids in zip(("chosen", "rejected"), encoded.sequences):
            if len(ids) <= encoded.boundary:
                raise UserError(f"{what}, row {index}: the {name} response has no token after the prompt they "
                                "share, so there is nothing to compare; fix or drop the row.")  # fmt: skip


def fit_dataset(dataset: datasets.Dataset, tokenizer, kind: str, *, max_length: int, on_too_long: str, what: str,
                training: dict | None = None, limit_key: str = "data.max_length", check: bool = True,
                split_prompt: bool = False) -> tuple[datasets.Dataset, LengthReport]:  # fmt: skip
    """Tokenize `dataset` (from `load_data`, of `kind`) as its trainer would, apply `on_too_long` against
    `max_length`, and return the trainer-ready dataset with its LengthReport. `training` is the recipe's
    `training:` section (SFT reads assistant_only_loss / completion_only_loss from it); `split_prompt`: pairs for
    DPO-style trainers, which need a prompt (`check_prompted`) and take it apart from the responses."""
    training = training or {}
    template = sft_template_for_loss(tokenizer, training) if kind == "sft" else None
    encodings = encode_dataset(dataset, tokenizer, kind, assistant_only_loss=bool(training.get("assistant_only_loss")),
                               chat_template=template)  # fmt: skip
    if split_prompt and check:
        check_prompted(encodings, what)
    if kind == "unpaired" and check:
        check_unpaired(encodings, dataset, what)
    fitted = fit_rows(encodings, max_length=max_length, on_too_long=on_too_long, what=what, limit_key=limit_key,
                      check=check)  # fmt: skip
    if kind == "sft" and check:
        _check_trainable(fitted, training, what)
    return trainer_dataset(dataset, kind, fitted, split_prompt=split_prompt), fitted.report


# ---------------------------------------------------------------- stage entry points


def fit_stage_data(stage, recipe, tokenizer, train, evaluation):
    """`train` / `evaluation` of a TRL-backed stage cut to `data.max_length` by `data.on_too_long`; returns
    (train, evaluation, {"train": report, "eval": report}). Stages whose TRL config takes no max_length (GRPO,
    RLOO) are passed through with no reports."""
    if not stage.length_key:
        return train, evaluation, {}
    spec = recipe.data
    reports = {}
    kwargs = {"max_length": spec.max_length, "on_too_long": spec.on_too_long, "training": recipe.training,
              "split_prompt": stage.split_prompt}
    train, reports["train"] = fit_dataset(train, tokenizer, stage.data_kind, what="data.train", **kwargs)
    warn(reports["train"])
    if evaluation is not None:
        evaluation, reports["eval"] = fit_dataset(evaluation, tokenizer, stage.data_kind, what="data.eval", **kwargs)
        warn(reports["eval"])
    return train, evaluation, reports


def row_counts(trainer, reports: dict[str, LengthReport], rows_read: int) -> dict[str, int]:
    """The summary's row counts, checked against what the trainer holds: a row lost inside TRL is a bug here."""
    held = len(trainer.train_dataset)
    report = reports.get("train")
    if report is None:
        return {"rows read": rows_read, "rows kept": held}
    packed = getattr(trainer.args, "packing", False)  # packing joins rows: the trainer holds fewer, longer ones
    if held != report.kept and not packed:
        raise RuntimeError(f"the trainer holds {held} training rows but {report.kept} were kept: TRL removed rows "
                           "that rlhf_cli.lengths measured as fitting; please report this.")  # fmt: skip
    counts = report.counts()
    if "eval" in reports:
        counts.update(reports["eval"].counts("eval "))
    return counts


def fit_prompts(prompts: datasets.Dataset, tokenizer, *, max_length: int, on_too_long: str, what: str = "data.train",
                check: bool = True) -> tuple[datasets.Dataset, LengthReport]:  # fmt: skip
    """PPO prompts: the kept rows with an `input_ids` column of prompt ids (each its last `max_length` tokens
    under truncate), and the report."""
    return fit_dataset(prompts, tokenizer, "prompt", max_length=max_length, on_too_long=on_too_long, what=what,
                       check=check)  # fmt: skip


def check_prompts(recipe, prompts: datasets.Dataset) -> None:
    """Apply `data.on_too_long` to PPO prompts with the policy's tokenizer alone, so that `error` (or `drop`
    leaving no prompt) stops the run before any model is loaded."""
    from rlhf_cli.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(recipe.model, resolve_model_path(recipe.model, recipe.seed),
                               conversational=isinstance(prompts[0]["prompt"], list))  # fmt: skip
    fit_prompts(prompts, tokenizer, max_length=recipe.data.max_length, on_too_long=recipe.data.on_too_long)
