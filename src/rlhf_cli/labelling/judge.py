"""A local instruction-tuned model as a pairwise judge under a constitution, and constitutional critique-and-revise.

The judge is asked, in chat messages, which of two responses better follows the principles of a constitution (system
message: the principles; user message: the conversation, Response A, Response B and the question). Its verdict is
read from ONE forward pass, not from generated text: at the position after the generation prompt,

    p(A) = exp(l_A) / (exp(l_A) + exp(l_B)),    l_X = logsumexp of the logits of the tokens that spell X ("A", " A")

so every verdict has a probability. Language models favour a position (often the first), so every pair (x, y) is
asked in both orders:

    p1 = p(first shown is better) with x shown first,   p2 = the same with y shown first
    P(x better) = (p1 + (1 - p2)) / 2                       (the position-debiased probability; the confidence)

The pair is consistent when both orders pick the same candidate (p1 > 1/2 and p2 < 1/2: x; p1 < 1/2 and p2 > 1/2:
y). Otherwise both orders picked the same position (or one had no preference at all), and the verdict says more about
the position than about the responses: it is dropped (outcome "skip") or kept as a tie, as `inconsistent` says. The
position-bias rate is the share of judged pairs whose two orders picked the same position. `decide` is that logic
alone (two probabilities in, a verdict out); `ModelJudge` is the model part; `judge_items` runs every pair of every
item's candidates (K(K-1)/2 pairs, each in both orders) through any judge and counts what happened (`JudgeStats`).

Critique-and-revise (`critique_and_revise`, Constitutional AI's supervised phase, Bai et al. 2022): for each prompt and
sampled response a principle is drawn, the model critiques its response against it, then revises the response given
the critique; the revisions become prompt/completion SFT rows, the original and the critique kept beside them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from rlhf_cli.errors import UserError
from rlhf_cli.labelling.records import Item, Outcome, PairLabel

if TYPE_CHECKING:
    from rlhf_cli.recipe import ModelSpec, SamplingSpec

DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.md")
Inconsistent = Literal["drop", "tie"]

JUDGE_SYSTEM = "You judge the responses of an AI assistant. A good response follows these principles:\n{principles}"
JUDGE_QUESTION = "Which response better follows the principles? Answer with a single letter: A or B."
CRITIQUE_REQUEST = ("Critique your last response against this principle: {principle}\n"
                    "Name the specific ways in which it falls short, briefly. If it has none, say so.")  # fmt: skip
REVISION_REQUEST = ("Rewrite your response so that it fixes the problems your critique named and follows the "
                    "principle: {principle}\nReply with the rewritten response only.")  # fmt: skip


# ---------------------------------------------------------------- the constitution

_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def parse_constitution(text: str) -> list[str]:
    """The principles of a markdown/text constitution, in file order.

    Headings (`#` lines) and HTML comments are not principles. When the file has bullets ("- ", "* ", "+ ", "1. ",
    "1) "), each bullet is one principle (its continuation lines joined into it) and prose paragraphs are commentary;
    a file without bullets gives one principle per paragraph (paragraphs are separated by blank lines).
    """
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    has_bullets = any(_BULLET.match(line) for line in lines)
    principles: list[list[str]] = []
    current: list[str] | None = None
    for line in lines:
        if not line.strip():
            current = None  # a blank line ends a bullet or a paragraph
            continue
        if _BULLET.match(line):
            current = [_BULLET.sub("", line).strip()]
            principles.append(current)
        elif current is not None:
            current.append(line.strip())
        elif not has_bullets:
            current = [line.strip()]
            principles.append(current)
        # else: prose between bullets, commentary
    return [" ".join(words) for words in principles if " ".join(words).strip()]


def load_constitution(path: str | Path | None = None) -> list[str]:
    """The principles of the constitution at `path` (the shipped default, constitution.md, when None)."""
    source = Path(path).expanduser() if path is not None else DEFAULT_CONSTITUTION
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Cannot read the constitution {str(source)!r}: {exc}") from None
    principles = parse_constitution(text)
    if not principles:
        raise UserError(f"The constitution {str(source)!r} holds no principles. Write one principle per bullet "
                        f"('- Be honest: ...') or per paragraph; headings and comments do not count.")  # fmt: skip
    return principles


# ---------------------------------------------------------------- the pure verdict


@dataclass(frozen=True)
class Verdict:
    """The judge's answer on one pair (x, y) from its two orders; `outcome` is in the label's terms (a = x)."""

    outcome: Outcome
    p_x: float  # P(x better) = (p1 + (1 - p2)) / 2
    consistent: bool  # both orders picked the same candidate
    same_position: Literal["first", "second"] | None  # inconsistent pairs: the position both orders picked
    confidence: float | None  # consistent pairs: the probability of the verdict, max(p_x, 1 - p_x)


def decide(p1: float, p2: float, inconsistent: Inconsistent = "drop") -> Verdict:
    """The verdict on a pair (x, y) from p1 = p(first shown is better) with x first and p2 = the same with y first.

    x wins when p1 > 1/2 and p2 < 1/2, y wins when p1 < 1/2 and p2 > 1/2 (the two orders agree on the candidate);
    anything else is inconsistent: both orders picked the first position (p1, p2 > 1/2), both the second, or one
    order had no preference (exactly 1/2). Inconsistent pairs become "skip" (drop) or "tie".
    """
    if inconsistent not in ("drop", "tie"):
        raise ValueError(f"inconsistent must be 'drop' or 'tie', not {inconsistent!r}")
    for value in (p1, p2):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a probability must lie in [0, 1], got {value!r}")
    p_x = (p1 + (1.0 - p2)) / 2.0
    if (p1 > 0.5 and p2 < 0.5) or (p1 < 0.5 and p2 > 0.5):
        return Verdict("a" if p1 > 0.5 else "b", p_x, True, None, max(p_x, 1.0 - p_x))
    same = "first" if p1 > 0.5 and p2 > 0.5 else "second" if p1 < 0.5 and p2 < 0.5 else None
    return Verdict("skip" if inconsistent == "drop" else "tie", p_x, False, same, None)


@dataclass
class JudgeStats:
    """What happened to the pairs a judge was asked about."""

    inconsistent_as: Inconsistent = "drop"
    pairs: int = 0  # judged: both orders read
    consistent: int = 0
    same_first: int = 0  # inconsistent, both orders picked the first position
    same_second: int = 0
    first_picks: int = 0  # single orders whose verdict was the first position (p > 1/2)
    confidences: list[float] = field(default_factory=list)  # of the consistent verdicts
    answer_masses: list[float] = field(default_factory=list)  # p(A) + p(B) in the whole vocabulary, per order read
    identical: int = 0  # pairs of identical candidates: ties, not asked
    unread: int = 0  # pairs the judge could not read (too long): skipped

    def add(self, verdict: Verdict, p1: float, p2: float) -> None:
        self.pairs += 1
        self.consistent += verdict.consistent
        self.same_first += verdict.same_position == "first"
        self.same_second += verdict.same_position == "second"
        self.first_picks += (p1 > 0.5) + (p2 > 0.5)
        if verdict.confidence is not None:
            self.confidences.append(verdict.confidence)

    @property
    def position_bias_rate(self) -> float | None:
        """Share of judged pairs whose two orders picked the same position."""
        return (self.same_first + self.same_second) / self.pairs if self.pairs else None

    @property
    def first_position_rate(self) -> float | None:
        """Share of single-order verdicts that picked the first position shown (1/2 for a judge with no bias)."""
        return self.first_picks / (2 * self.pairs) if self.pairs else None

    @property
    def favoured_position(self) -> str:
        if self.same_first != self.same_second:
            return "first" if self.same_first > self.same_second else "second"
        rate = self.first_position_rate
        return "neither" if rate is None or rate == 0.5 else "first" if rate > 0.5 else "second"

    def report(self) -> dict[str, Any]:
        inconsistent = self.pairs - self.consistent
        mean = lambda values: sum(values) / len(values) if values else None  # noqa: E731
        return {
            "pairs judged (both orders)": self.pairs,
            "consistent": self.consistent,
            "inconsistent": inconsistent,
            "inconsistent pairs are": "dropped" if self.inconsistent_as == "drop" else "ties",
            "position-bias rate": self.position_bias_rate,
            "favoured position": self.favoured_position,
            "first-position preference rate": self.first_position_rate,
            "mean confidence (consistent)": mean(self.confidences),
            "mean answer-token mass p(A)+p(B)": mean(self.answer_masses),
            "identical candidates (ties, not asked)": self.identical,
            "pairs too long for the judge (skipped)": self.unread,
        }


# ---------------------------------------------------------------- asking any judge


@dataclass(frozen=True)
class Question:
    """One order of one pair: the prompt and the two responses as shown, `first` as Response A."""

    prompt: Any  # text or a list of {"role", "content"} messages
    first: str
    second: str


@dataclass(frozen=True)
class Reading:
    """A judge's answer to one Question: p(first shown is better), or None with a note when it could not answer."""

    p_first: float | None
    answer_mass: float | None = None  # p(A) + p(B) under the model's full next-token distribution
    note: str = ""


class Judge(Protocol):
    def __call__(self, questions: list[Question]) -> list[Reading]: ...


def judge_items(items: list[Item], judge: Judge, *, inconsistent: Inconsistent = "drop", batch_size: int = 8,
                annotator: str = "", progress=None, label: str = "judging",
                ) -> tuple[list[PairLabel], JudgeStats]:  # fmt: skip
    """PairLabels for every pair of every item's candidates, each pair asked in both orders, `batch_size` questions
    per call of `judge`; labels in item order, a < b. Identical candidates are ties without asking."""
    from rlhf_cli.inference import chunks

    if inconsistent not in ("drop", "tie"):
        raise ValueError(f"inconsistent must be 'drop' or 'tie', not {inconsistent!r}")
    stats = JudgeStats(inconsistent_as=inconsistent)
    slots: list[PairLabel | tuple[Item, int, int]] = []
    questions: list[Question] = []
    for item in items:
        for i, j in combinations(range(len(item.candidates)), 2):
            x, y = item.candidates[i], item.candidates[j]
            if x == y:
                stats.identical += 1
                slots.append(PairLabel(item.item_id, i, j, "tie", "judge", annotator,
                                       details={"reason": "identical candidates"}))  # fmt: skip
                continue
            slots.append((item, i, j))
            questions += [Question(item.prompt, x, y), Question(item.prompt, y, x)]
    readings: list[Reading] = []
    task = progress.add_task(label, total=len(questions)) if progress is not None else None
    for rows in chunks(len(questions), batch_size):
        answered = list(judge([questions[k] for k in rows]))
        if len(answered) != len(rows):
            raise RuntimeError(f"the judge answered {len(answered)} of {len(rows)} questions")
        readings += answered
        if task is not None:
            progress.advance(task, len(rows))

    labels, asked = [], iter(zip(readings[0::2], readings[1::2], strict=True))
    for slot in slots:
        if isinstance(slot, PairLabel):
            labels.append(slot)
            continue
        item, i, j = slot
        first, second = next(asked)
        if first.p_first is None or second.p_first is None:
            stats.unread += 1
            note = first.note or second.note or "the judge gave no answer"
            labels.append(PairLabel(item.item_id, i, j, "skip", "judge", annotator, details={"reason": note}))
            continue
        p1, p2 = first.p_first, second.p_first
        verdict = decide(p1, p2, inconsistent)
        stats.add(verdict, p1, p2)
        stats.answer_masses += [r.answer_mass for r in (first, second) if r.answer_mass is not None]
        details: dict[str, Any] = {"p_first": [p1, p2], "p_a": verdict.p_x, "consistent": verdict.consistent}
        if first.answer_mass is not None and second.answer_mass is not None:
            details["answer_mass"] = [first.answer_mass, second.answer_mass]
        if not verdict.consistent:
            picked = f"both orders picked the {verdict.same_position} position" if verdict.same_position else \
                "one order had no preference"  # fmt: skip
            details["reason"] = f"inconsistent: {picked}"
        labels.append(PairLabel(item.item_id, i, j, verdict.outcome, "judge", annotator, verdict.confidence, details))
    return labels, stats


# ---------------------------------------------------------------- the model part


def require_chat_template(tokenizer, name: str, use: str = "the judge") -> None:
    """Refuse a tokenizer without a chat template: the prompts are chat messages for an instruction-tuned model."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{name} has no chat template, and {use} talks to the model in chat messages. Use an "
                        f"instruction-tuned (chat) model, such as SmolLM2-135M-Instruct or a Qwen2.5-*-Instruct, or "
                        f"give the model's template as `chat_template` (a Jinja string or a .jinja file) in its "
                        f"model section.")  # fmt: skip


def answer_token_ids(tokenizer, name: str) -> tuple[list[int], list[int]]:
    """The token ids that spell "A" and "B" on their own ("A", " A"; each a single token that decodes to the
    letter). A tokenizer that spells neither form of a letter as one token cannot give the judge's probabilities."""
    found: dict[str, list[int]] = {}
    for letter in "AB":
        ids: list[int] = []
        for variant in (letter, " " + letter):
            encoded = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
            if len(encoded) == 1 and tokenizer.decode(encoded).strip() == letter and encoded[0] not in ids:
                ids.append(encoded[0])
        if not ids:
            raise UserError(f"The tokenizer of {name} spells neither {letter!r} nor {' ' + letter!r} as a single "
                            f"token, so the judge's answer cannot be read from one next-token distribution. Use "
                            f"another judge model.")  # fmt: skip
        found[letter] = ids
    if set(found["A"]) & set(found["B"]):
        raise UserError(f"The tokenizer of {name} spells 'A' and 'B' with a shared token; use another judge model.")
    return found["A"], found["B"]


def conversation_text(prompt: Any) -> str:
    """A prompt as the judge reads it: text as is, a message list as 'User: ...' / 'Assistant: ...' lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{str(message['role']).capitalize()}: {message['content']}" for message in prompt)


def judge_messages(principles: list[str], question: Question) -> list[dict[str, str]]:
    """The chat messages of one question: the numbered principles as the system message, the rest as the user's."""
    listed = "\n".join(f"{number}. {principle}" for number, principle in enumerate(principles, 1))
    heading = "Conversation" if isinstance(question.prompt, list) else "Prompt"
    user = (f"[{heading}]\n{conversation_text(question.prompt)}\n\n[Response A]\n{question.first}\n\n"
            f"[Response B]\n{question.second}\n\n{JUDGE_QUESTION}")  # fmt: skip
    return [{"role": "system", "content": JUDGE_SYSTEM.format(principles=listed)}, {"role": "user", "content": user}]


class ModelJudge:
    """A causal LM as a Judge: each question rendered with the tokenizer's chat template and generation prompt, one
    left-padded forward pass per call, p(first shown is better) from the next-token logits of the A and B tokens.

    A question longer than `max_length` tokens (default: the model's positions) is not truncated (that would cut the
    principles or a response) but answered with None and a note, so the pair is skipped and counted.
    """

    def __init__(self, model, tokenizer, principles: list[str], *, name: str, max_length: int | None = None):
        from rlhf_cli.inference import positions_limit

        if not principles:
            raise UserError("The judge needs at least one principle.")
        require_chat_template(tokenizer, name)
        self.model, self.tokenizer, self.principles, self.name = model, tokenizer, list(principles), name
        self.a_ids, self.b_ids = answer_token_ids(tokenizer, name)
        self.max_length = max_length or positions_limit(model)
        self.system_role = True  # cleared when the template refuses a system message (then it opens the user's)

    def encode(self, question: Question) -> list[int]:
        messages = judge_messages(self.principles, question)
        if self.system_role:
            try:
                return self._render(messages)
            except Exception:  # noqa: BLE001 -- templates refuse a system role in their own ways (TemplateError, ...)
                self.system_role = False
        merged = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}]
        try:
            return self._render(merged)
        except Exception as exc:  # noqa: BLE001 -- the user's template: one paragraph, no traceback
            raise UserError(f"The chat template of {self.name} cannot render the judge's messages: "
                            f"{type(exc).__name__}: {exc}") from None  # fmt: skip

    def _render(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)  # fmt: skip
        return list(ids)

    def __call__(self, questions: list[Question]) -> list[Reading]:
        import torch

        from rlhf_cli.ppo.trainer import left_pad

        encoded = [self.encode(question) for question in questions]
        readings: list[Reading | None] = [None] * len(questions)
        fit = []
        for row, ids in enumerate(encoded):
            if self.max_length is not None and len(ids) > self.max_length:
                readings[row] = Reading(None, note=f"the judge prompt is {len(ids)} tokens, longer than the judge's "
                                                   f"{self.max_length}")  # fmt: skip
            else:
                fit.append(row)
        if fit:
            ids, mask = left_pad([encoded[row] for row in fit], self.tokenizer.pad_token_id, self.model.device)
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # left padding shifts positions
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                                    logits_to_keep=1).logits[:, -1, :].float()  # fmt: skip
            logprobs = logits.log_softmax(-1)
            log_a = torch.logsumexp(logprobs[:, self.a_ids], dim=-1)
            log_b = torch.logsumexp(logprobs[:, self.b_ids], dim=-1)
            p_first = torch.sigmoid(log_a - log_b)  # = exp(l_A) / (exp(l_A) + exp(l_B))
            mass = log_a.exp() + log_b.exp()
            for n, row in enumerate(fit):
                readings[row] = Reading(float(p_first[n]), float(mass[n]))
        return readings  # type: ignore[return-value]


def load_judge_model(spec: ModelSpec, seed: int, what: str = "label.judge"):
    """(model, tokenizer) of a judge: its own tokenizer and chat template (none is made up for it), checked for a
    template and single-token A/B answers before the model loads."""
    from rlhf_cli.models import load_tokenizer, resolve_model_path
    from rlhf_cli.inference import load_causal_lm

    name = f"{what} ({spec.name_or_path})"
    tokenizer = load_tokenizer(spec, resolve_model_path(spec, seed), conversational=False)
    require_chat_template(tokenizer, name)
    answer_token_ids(tokenizer, name)
    return load_causal_lm(spec, seed, what, conversational=False, tokenizer=tokenizer)


# ---------------------------------------------------------------- critique and revise (Constitutional AI, SL phase)


def as_messages(prompt: Any) -> list[dict[str, str]]:
    return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]


def critique_and_revise(model, tokenizer, prompts: list, responses: list[str], principles: list[str],
                        sampling: SamplingSpec, seed: int, *, name: str = "model", progress=None,
                        ) -> tuple[list[dict], dict[str, Any]]:  # fmt: skip
    """SFT rows {prompt, completion, original, critique, principle} and a report, one row per (prompt, response).

    For each response a principle is drawn (seeded), the model is asked in the same conversation to critique its
    response against it (CRITIQUE_REQUEST), then to rewrite it given that critique (REVISION_REQUEST); both are
    sampled with `inference.sample` (batched, seeded). The completion is the revision, in the prompt's style.
    """
    from rlhf_cli.ppo.trainer import encode_prompts
    from rlhf_cli.inference import chunks, completion_field, prompt_budget, sample

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not principles:
        raise UserError("The critique-and-revise mode needs at least one principle.")
    require_chat_template(tokenizer, name, use="the critique-and-revise mode")
    rng = random.Random(seed)
    drawn = [rng.choice(principles) for _ in prompts]
    answered = [as_messages(prompt) + [{"role": "assistant", "content": response}]
                for prompt, response in zip(prompts, responses)]  # fmt: skip
    asks = [conversation + [{"role": "user", "content": CRITIQUE_REQUEST.format(principle=principle)}]
            for conversation, principle in zip(answered, drawn)]  # fmt: skip
    budget = prompt_budget(model, sampling)
    critiques = sample(model, tokenizer, encode_prompts({"prompt": asks}, tokenizer, budget), sampling, seed,
                       progress, "critiques")  # fmt: skip
    revise = [ask + [{"role": "assistant", "content": critique},
                     {"role": "user", "content": REVISION_REQUEST.format(principle=principle)}]
              for ask, critique, principle in zip(asks, critiques.texts, drawn)]  # fmt: skip
    # Seeds after the critiques' batches (sample seeds batch k with seed + k), so no batch reuses a critique's draws.
    revision_seed = seed + len(chunks(len(asks), sampling.batch_size))
    revisions = sample(model, tokenizer, encode_prompts({"prompt": revise}, tokenizer, budget), sampling,
                       revision_seed, progress, "revisions")  # fmt: skip
    rows = [{"prompt": prompt, "completion": completion_field(prompt, revision), "original": response,
             "critique": critique, "principle": principle}
            for prompt, revision, response, critique, principle
            in zip(prompts, revisions.texts, responses, critiques.texts, drawn)]  # fmt: skip
    report = {
        "responses revised": len(rows),
        "critiques cut at max_new_tokens": sum(not done for done in critiques.finished),
        "revisions cut at max_new_tokens": sum(not done for done in revisions.finished),
        "empty revisions": sum(not text.strip() for text in revisions.texts),
    }
    return rows, report
