"""Ready-made rule rewards for `rlhf ppo`: point a recipe at one with `ppo: {reward: {function: ...}}`.

A rule reward is called as `fn(prompts, completions)` with one prompt (the data's text, or its message list) and
one decoded completion per rollout, and returns one float per rollout.

Exact match on the final number (GSM8K and similar maths data):

    r(x, y) = 1  if  n(y) = g(x)   else 0

where y is the completion, n(y) = `extract_final_number(y)` is the number it ends on, g(x) is the gold answer of
prompt x, and numbers are compared as exact decimals (72 = 72.0 = 72.00, 1,080 = 1080). A completion with no
number scores 0.

The rule finds g(x) by the prompt's text: the prompt (for a message list, its last user turn) must be a question
of the answers file, compared with runs of whitespace collapsed and ends stripped. In a recipe:

    ppo:
      reward:
        function: rlhf_cli.rewards:gsm8k_exact_match

with the environment variable RLHF_GSM8K_FILE naming the GSM8K jsonl file(s) the prompts come from. For other
data, build the reward in your own module: `my_reward = exact_match_reward(load_answers("data.jsonl", ...))`.

Standard library only: no torch, so the CLI imports this module at no cost.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError

__all__ = [
    "GSM8K_ENV",
    "exact_match_reward",
    "extract_final_number",
    "gsm8k_exact_match",
    "gsm8k_gold",
    "load_answers",
    "prompt_text",
]

GSM8K_ENV = "RLHF_GSM8K_FILE"
GSM8K_MARKER = "####"

Gold = Decimal | int | float | str
RuleReward = Callable[..., list[float]]

# A number: optional sign, digits with optional thousands commas (1,234,567), optional decimals. It may not start
# inside a word or another number (the lookbehind), so "10-3" reads as 10 and 3, not 10 and -3; a comma group
# must be whole ("1,2345" reads as 1 and 2345). ASCII digits only.
_NUMBER = re.compile(
    r"(?<![A-Za-z0-9_.])"
    r"(?P<sign>[-\u2212])?"
    r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"
    r"(?P<frac>\.[0-9]+)?"
)


# ---------------------------------------------------------------- parsing


def _numbers(text: str) -> list[Decimal]:
    return [
        Decimal(("-" if match["sign"] else "") + match["int"].replace(",", "") + (match["frac"] or ""))
        for match in _NUMBER.finditer(text)
    ]


def extract_final_number(text: str) -> Decimal | None:
    """The number a solution ends on, or None when it has none.

    If the text holds '####' with a number after the last '####', that number (GSM8K's answer line); otherwise the
    last number in the text. Thousands commas are dropped ("1,234" -> 1234), a sign is kept ("-5", "\u22125"),
    currency and punctuation around the number are ignored ("$18", "1,234.").
    """
    _, marker, tail = text.rpartition(GSM8K_MARKER)
    if marker:
        after = _numbers(tail)
        if after:
            return after[0]
    found = _numbers(text)
    return found[-1] if found else None


def gsm8k_gold(answer_field: str) -> Decimal:
    """The gold answer of a GSM8K `answer` field ("...reasoning...\\n#### 72" -> 72).

    Raises ValueError when the field has no '####' line with a number after it.
    """
    _, marker, tail = answer_field.rpartition(GSM8K_MARKER)
    numbers = _numbers(tail) if marker else []
    if not numbers:
        raise ValueError(f"no '{GSM8K_MARKER} <number>' answer line in {answer_field[-60:]!r}")
    return numbers[0]


def _as_gold(value: Gold) -> Decimal:
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bool):
        raise TypeError(f"a gold answer must be a number or text, got {value!r}")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))  # 0.1 -> Decimal("0.1"), not its binary expansion
    number = extract_final_number(str(value))
    if number is None:
        raise ValueError(f"no number in the gold answer {value!r}")
    return number


# ---------------------------------------------------------------- prompts


def _key(text: str) -> str:
    return " ".join(text.split())


def prompt_text(prompt: str | Sequence[Mapping[str, Any]]) -> str:
    """The question a prompt asks: the prompt itself for text, the last user turn's content for a message list."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence):
        for message in reversed(prompt):
            if isinstance(message, Mapping) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
        raise UserError(f"Rule reward: the prompt {_shorten(repr(prompt))} has no user turn with text content.")
    raise UserError(f"Rule reward: a prompt must be text or a list of messages, got {type(prompt).__name__}.")


def _shorten(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- rewards


def exact_match_reward(answers: Mapping[str, Gold], *, source: str = "the answers given") -> RuleReward:
    """A rule reward scoring 1.0 when a completion's final number equals the gold answer of its prompt, else 0.0.

    `answers` maps question text to its gold answer (a number, or text holding one, e.g. "1,080" or "#### 72").
    Questions are matched to prompts by `prompt_text`, with whitespace runs collapsed and ends stripped. A prompt
    with no answer raises UserError naming it and `source`.
    """
    gold = {_key(question): _as_gold(value) for question, value in answers.items()}

    def reward(prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        scores = []
        for prompt, completion in zip(prompts, completions, strict=True):
            question = prompt_text(prompt)
            expected = gold.get(_key(question))
            if expected is None:
                raise UserError(
                    f"Exact-match reward: no gold answer for the prompt {_shorten(question)!r}: it is not one of the "
                    f"{len(gold)} questions in {source}. Train on prompts from the same data the answers come from."
                )
            scores.append(1.0 if extract_final_number(completion) == expected else 0.0)
        return scores

    reward.__doc__ = f"Exact match of the final number against {len(gold)} gold answers from {source}."
    return reward


def load_answers(
    path: str | Path,
    *,
    question_key: str = "question",
    answer_key: str = "answer",
    parse: Callable[[str], Gold] = gsm8k_gold,
) -> dict[str, Decimal]:
    """Question text -> gold answer from a jsonl file (or every .jsonl file in a directory).

    Each row's `answer_key` field goes through `parse` (GSM8K's '#### N' line by default). Raises UserError naming
    the file and line for a bad row, and for a question given two different answers.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise UserError(f"{path} holds no .jsonl files of questions and answers.")
    elif path.is_file():
        files = [path]
    else:
        raise UserError(f"Answers file {path} does not exist.")
    answers: dict[str, Decimal] = {}
    for file in files:
        with open(file, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                where = f"{file}, line {number}"
                try:
                    row = json.loads(line)
                    question, answer = row[question_key], row[answer_key]
                    gold = _as_gold(parse(answer))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{where} is not valid JSON: {exc.msg}.") from None
                except KeyError:
                    raise UserError(f"{where}: each row needs {question_key!r} and {answer_key!r} fields.") from None
                except TypeError as exc:
                    raise UserError(f"{where}: a row must be a mapping with text fields ({exc}).") from None
                except ValueError as exc:
                    raise UserError(f"{where}: {exc}.") from None
                key = _key(str(question))
                if answers.get(key, gold) != gold:
                    raise UserError(f"{where}: the question {_shorten(key)!r} appears with two different answers.")
                answers[key] = gold
    return answers


@functools.lru_cache(maxsize=4)
def _gsm8k_reward(spec: str) -> RuleReward:
    answers: dict[str, Decimal] = {}
    for part in filter(None, spec.split(os.pathsep)):
        for question, gold in load_answers(part).items():
            if answers.get(question, gold) != gold:
                raise UserError(f"{GSM8K_ENV}: the question {_shorten(question)!r} has two different answers.")
            answers[question] = gold
    return exact_match_reward(answers, source=f"{GSM8K_ENV}={spec}")


def gsm8k_exact_match(prompts: Sequence[Any], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 when a completion's final number equals the GSM8K gold answer of its prompt, else 0.0.

    r(x, y) = 1[ extract_final_number(y) = gsm8k_gold(answer of question x) ].

    The gold answers are read (once per value) from the GSM8K jsonl named by the environment variable
    RLHF_GSM8K_FILE: a file, a directory of .jsonl files, or several of these joined by os.pathsep (':' on
    Linux), with rows {"question", "answer": "...#### N"}. Prompts are matched to questions by text (see
    `exact_match_reward`), so they must come from the same rows, e.g. `columns: {instruction: question}`.
    """
    spec = os.environ.get(GSM8K_ENV, "").strip()
    if not spec:
        raise UserError(
            f"rlhf_cli.rewards:gsm8k_exact_match looks up each prompt's gold answer in the GSM8K data: set "
            f"{GSM8K_ENV} to the jsonl file (or directory) the prompts come from, e.g. "
            f"`export {GSM8K_ENV}=../shared/data/gsm8k/train.jsonl`."
        )
    return _gsm8k_reward(spec)(prompts, completions, **kwargs)


def load_rule_reward(spec: str, what: str = "ppo.reward.function"):
    """Import `module.path:function`; `what` is the recipe key that named it, for the error message."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{what} {spec!r} cannot be imported: {exc}") from None
    if not callable(function):
        raise UserError(f"{what} {spec!r} is not callable.")
    return function


# ---------------------------------------------------------------- reward-model ensembles

# How the scores r_1..r_K of one response by K reward models (an ensemble) become one reward (Coste et al. 2023,
# "Reward Model Ensembles Help Mitigate Overoptimization"):
#
#     mean:            s = (1/K) * sum_k r_k
#     min:             s = min_k r_k                               (worst case: as good as the harshest member says)
#     mean_minus_std:  s = (1/K) * sum_k r_k - c * std_k r_k       (uncertainty-weighted, c = std_coef >= 0)
#
# std is the population standard deviation, sqrt((1/K) * sum_k (r_k - mean)^2) (divisor K, not K - 1): it describes
# these K members' disagreement, and is 0 for one member. `ensemble_spread` gives it per response.
COMBINE_MODES = ("mean", "min", "mean_minus_std")


def _columns(per_member: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    if not per_member:
        raise ValueError("no scores to combine")
    if len({len(scores) for scores in per_member}) != 1:
        raise ValueError("every member (scorer) must score the same candidates (responses)")
    return list(zip(*per_member))


def _std(column: Sequence[float]) -> float:
    mean = sum(column) / len(column)
    return (sum((value - mean) ** 2 for value in column) / len(column)) ** 0.5


def ensemble_spread(per_member: Sequence[Sequence[float]]) -> list[float]:
    """The population std over members of each response's scores: sqrt((1/K) * sum_k (r_k - mean_k r_k)^2)."""
    return [_std(column) for column in _columns(per_member)]


def combine_scores(per_member: Sequence[Sequence[float]], how: str = "mean", std_coef: float = 1.0) -> list[float]:
    """One score per response from every member's scores of the same responses (`per_member[k][i]` = r_k of
    response i): mean, min or mean_minus_std (mean - std_coef * population std), as in the comment above."""
    if how not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)}, not {how!r}")
    if std_coef < 0:
        raise ValueError(f"std_coef must be >= 0, got {std_coef}")
    columns = _columns(per_member)
    if how == "min":
        return [float(min(column)) for column in columns]
    means = [sum(column) / len(column) for column in columns]
    if how == "mean":
        return means
    return [mean - std_coef * _std(column) for mean, column in zip(means, columns)]


ENSEMBLE_FILE = "ensemble.json"  # written by `rlhf train-rm` with `ensemble:` next to its member-k/ directories


def ensemble_member_paths(path: str | None) -> list[str] | None:
    """The member directories of an ensemble directory (one with ensemble.json), in member order; None otherwise."""
    if not path:
        return None
    record_file = Path(path) / ENSEMBLE_FILE
    if not record_file.is_file():
        return None
    try:
        members = json.loads(record_file.read_text(encoding="utf-8"))["members"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{record_file} cannot be read as an ensemble record ({exc}); rerun `rlhf train-rm`.") from None
    paths = [str(Path(path) / member) for member in members]
    missing = [member for member in paths if not Path(member).is_dir()]
    if missing:
        raise UserError(f"{record_file} lists {missing[0]}, which does not exist: the ensemble is incomplete.")
    return paths


def reward_model_paths(spec: Any, what: str) -> list[str]:
    """The reward models a RewardSpec names (`models`, an ensemble directory in `model`, or one `model`); [] for a
    rule. `combine`/`std_coef` with a single reward model is an error: there is nothing to combine."""
    if getattr(spec, "function", None):
        return []
    paths = list(spec.models) if spec.models else ensemble_member_paths(spec.model) or [spec.model]
    if len(paths) < 2 and (spec.combine is not None or spec.std_coef is not None):
        raise UserError(f"{what}.combine combines several reward models, but {what}.model ({spec.model}) is a single "
                        "reward model (no ensemble.json): list several under models, point model at an ensemble "
                        "directory from `rlhf train-rm` with `ensemble:`, or remove combine/std_coef.")  # fmt: skip
    return paths
