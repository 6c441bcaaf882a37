"""The offline demo task: a tiny assistant that answers simple questions, politely and correctly or not.

Everything is generated from the templates below with a fixed seed, so the project ships its own data and the
builtin tokenizer is trained on the same text. Demonstrations are of mixed quality on purpose (as crowd data is);
preference pairs always prefer the polite, correct answer, so a reward model can learn the difference and a
policy optimised against it has room to improve.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Canada": "Ottawa", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "Cuba": "Havana", "Ireland": "Dublin",
}
_COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown", "a cloud": "white",
}
_SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "sheep": "baas",
    "lion": "roars", "owl": "hoots", "horse": "neighs", "frog": "croaks", "bee": "buzzes",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "happy": "sad",
    "open": "closed", "early": "late", "light": "dark", "full": "empty", "old": "new", "wet": "dry",
}

_POLITE_OPENERS = ["Sure!", "Good question!", "Happy to help.", "Of course!", "Great question!"]
_POLITE_CLOSERS = ["I hope that helps.", "Let me know if you have more questions.", "Thanks for asking!", ""]
_RUDE = [
    "I will not answer that.", "Figure it out yourself.", "That is a boring question.",
    "Stop asking me things.", "No.", "Whatever.",
]


def _questions(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, correct fact, wrong fact) for every template instance."""
    items = []
    for a in range(1, 10):
        for b in range(1, 10):
            wrong = a + b + rng.choice([-2, -1, 1, 2, 3])
            items.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."))
    capitals = list(_CAPITALS.values())
    for country, city in _CAPITALS.items():
        wrong = rng.choice([c for c in capitals if c != city])
        items.append((f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                      f"The capital of {country} is {wrong}."))
    colours = sorted(set(_COLOURS.values()))
    for thing, colour in _COLOURS.items():
        wrong = rng.choice([c for c in colours if c != colour])
        items.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}.",
                      f"{thing[0].upper() + thing[1:]} is {wrong}."))
    sounds = sorted(set(_SOUNDS.values()))
    for animal, sound in _SOUNDS.items():
        wrong = rng.choice([s for s in sounds if s != sound])
        items.append((f"What sound does a {animal} make?", f"A {animal} {sound}.", f"A {animal} {wrong}."))
    words = sorted(set(_OPPOSITES.values()))
    for word, opposite in _OPPOSITES.items():
        wrong = rng.choice([w for w in words if w != opposite])
        items.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.",
                      f"The opposite of {word} is {wrong}."))
    return items


def _good(fact: str, rng: random.Random) -> str:
    return " ".join(part for part in (rng.choice(_POLITE_OPENERS), fact, rng.choice(_POLITE_CLOSERS)) if part)


def _bad(fact: str, wrong: str, rng: random.Random) -> str:
    style = rng.choice(["rude", "wrong", "wrong_rude", "terse"])
    if style == "rude":
        return rng.choice(_RUDE)
    if style == "wrong":
        return wrong
    if style == "wrong_rude":
        return f"{wrong} {rng.choice(_RUDE)}"
    return fact.split(" is ")[-1] if " is " in fact else fact  # a bare word, no sentence


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def build_demo_rows(seed: int = 0) -> dict[str, list[dict]]:
    """The demo splits: `sft` (prompt/completion), `preference` (prompt/chosen/rejected), `prompts` (prompt only)."""
    rng = random.Random(seed)
    questions = _questions(rng)
    sft, preference = [], []
    for question, fact, wrong in questions:
        for _ in range(2):
            # Two demonstrations per question: mostly good, sometimes not (60/40).
            answer = _good(fact, rng) if rng.random() < 0.6 else _bad(fact, wrong, rng)
            sft.append({"prompt": _user(question), "completion": _assistant(answer)})
        for _ in range(2):
            preference.append({
                "prompt": _user(question),
                "chosen": _assistant(_good(fact, rng)),
                "rejected": _assistant(_bad(fact, wrong, rng)),
            })
    rng.shuffle(sft)
    rng.shuffle(preference)
    prompts = [{"prompt": _user(question)} for question, _, _ in questions]
    return {"sft": sft, "preference": preference, "prompts": prompts}


def demo_corpus(seed: int = 0) -> list[str]:
    """Every text of the demo task, for training the builtin tokenizer."""
    texts = []
    for rows in build_demo_rows(seed).values():
        for row in rows:
            for messages in row.values():
                texts.extend(message["content"] for message in messages)
    texts.extend(_RUDE + _POLITE_OPENERS + _POLITE_CLOSERS)
    return texts


def write_demo_data(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write sft.jsonl, preference.jsonl and prompts.jsonl into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in build_demo_rows(seed).items():
        path = paths[name] = directory / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


def _answers() -> dict[str, str]:
    """Question -> the word a correct answer must contain (the last word of the correct fact)."""
    return {question: fact.rstrip(".").split()[-1] for question, fact, _ in _questions(random.Random(0))}


def correct_answer(prompts, completions) -> list[float]:
    """A rule judge for the demo task: 1.0 when the completion states the right answer, else 0.0.

    The answer word must appear as a whole word: after "is " for sums, capitals, colours and opposites ("1 plus 1
    is 2"), anywhere for animal sounds ("A dog barks"). Politeness is not judged, so next to the demo reward model
    (which learnt mostly politeness) it is the independent check of `rlhf eval`'s judge: point
    `eval.judge.function` at `rlhf_cli.demo:correct_answer`. A prompt it does not know scores 0.0.
    """
    answers = _answers()
    scores = []
    for prompt, completion in zip(prompts, completions):
        question = prompt if isinstance(prompt, str) else next(
            (m["content"] for m in reversed(prompt) if m["role"] == "user"), "")  # fmt: skip
        answer = answers.get(question.strip())
        if answer is None:
            scores.append(0.0)
            continue
        before = "" if question.startswith("What sound") else r"\bis "
        scores.append(1.0 if re.search(before + re.escape(answer) + r"\b", completion) else 0.0)
    return scores


def _kinds() -> dict[str, tuple[str, re.Pattern]]:
    """Question -> (its subject, a pattern for an answer of the right kind: a number, a capital, a colour, ...)."""
    def words(values, before=r"\bis ") -> re.Pattern:  # as `correct_answer`: after "is", a sound anywhere
        return re.compile(before + r"(?:" + "|".join(sorted(map(re.escape, set(values)), key=len, reverse=True))
                          + r")\b")  # fmt: skip

    number, capital, colour = re.compile(r"\bis \d+\b"), words(_CAPITALS.values()), words(_COLOURS.values())
    sound, opposite = words(_SOUNDS.values(), before=r"\b"), words(_OPPOSITES.values())
    kinds = {}
    for question, fact, _ in _questions(random.Random(0)):
        if question.startswith("What is the capital of "):
            kinds[question] = (question[23:-1], capital)
        elif question.startswith("What color is "):
            kinds[question] = (question[14:-1].split()[-1], colour)
        elif question.startswith("What sound does a "):
            kinds[question] = (question[18:-6], sound)
        elif question.startswith("What is the opposite of "):
            kinds[question] = (question[24:-1], opposite)
        else:  # "What is A plus B?"
            kinds[question] = (question[8:-1], number)
    return kinds


_RUDE_PATTERN = re.compile("|".join(re.escape(text.rstrip(".")) for text in _RUDE if text != "No."))


def graded_answer(prompts, completions) -> list[float]:
    """A graded rule for the demo task, for labelling (the rounds of `recipes/tiny/iterative.yaml`): the right answer
    first, then how near a wrong one comes and the demo's manners. A completion scores the sum of

    - 1.0 for the right answer (as `correct_answer` judges it), else 0.3 for a wrong answer of the right kind where
      the answer goes: after "is" a number for a sum ("3 plus 9 is 11."), a capital city for a capital ("The
      capital of Peru is Oslo."), a colour, one of the opposite words; an animal sound anywhere;
    - 0.1 for naming the question's subject (the sum, the country, the thing, the animal, the word): an answer in a
      sentence, as the good demonstrations give;
    - 0.1 for opening with one of the demo's polite openers ("Sure!", "Good question!", ...), and 0.1 for one of
      its polite closers ("I hope that helps.", ...);
    - -0.2 for one of its rude phrases ("Figure it out yourself", "Whatever", ...).

    So a right answer (0.8 to 1.3) always beats a wrong one (-0.2 to 0.6), as under `correct_answer`, which is the
    gold; among wrong answers a near miss in a polite sentence beats rude noise, and among right ones the polite
    one wins. The demo's tiny policies are rarely right, so under `correct_answer` almost every candidate ties (0.0)
    and best-vs-worst labelling makes few pairs; the partial credit orders most of those. A prompt it does not
    know scores by manners alone.
    """
    right = correct_answer(prompts, completions)
    kinds = _kinds()
    scores = []
    for prompt, completion, correct in zip(prompts, completions, right):
        question = (prompt if isinstance(prompt, str) else next(
            (m["content"] for m in reversed(prompt) if m["role"] == "user"), "")).strip()  # fmt: skip
        subject, kind = kinds.get(question, (None, None))
        text = completion.strip()
        score = 1.0 if correct else (0.3 if kind is not None and kind.search(text) else 0.0)
        score += 0.1 if subject and re.search(r"\b" + re.escape(subject) + r"\b", text, re.IGNORECASE) else 0.0
        score += 0.1 if any(text.startswith(opener) for opener in _POLITE_OPENERS) else 0.0
        score += 0.1 if any(closer and closer in text for closer in _POLITE_CLOSERS) else 0.0
        score -= 0.2 if _RUDE_PATTERN.search(text) or text.rstrip(".") == "No" else 0.0
        scores.append(round(score, 6))
    return scores


def build_rule_pairs(seed: int = 0, candidates: int = 4) -> list[dict]:
    """Preference pairs labelled by the rule `correct_answer`, for a proxy reward model whose gold is that rule.

    Per question, `candidates` answers are drawn as the demonstrations are (polite and correct 60%, else rude,
    wrong, wrong and rude, or a bare word); every two candidates that `correct_answer` scores differently become a
    pair, the one it scores 1.0 chosen. Equal scores are ties and are left out. Politeness is not in the label,
    but correct answers are mostly polite ones here, so a reward model trained on these pairs also learns to like
    politeness: the spurious correlation that `recipes/tiny/overoptimisation.yaml` lets PPO exploit.
    """
    rng = random.Random(seed)
    pairs = []
    for question, fact, wrong in _questions(random.Random(0)):
        answers = [_good(fact, rng) if rng.random() < 0.6 else _bad(fact, wrong, rng) for _ in range(candidates)]
        marks = correct_answer([question] * candidates, answers)
        for i in range(candidates):
            for j in range(i + 1, candidates):
                if marks[i] != marks[j]:
                    chosen, rejected = (answers[i], answers[j]) if marks[i] > marks[j] else (answers[j], answers[i])
                    pairs.append({"prompt": _user(question), "chosen": _assistant(chosen),
                                  "rejected": _assistant(rejected)})  # fmt: skip
    rng.shuffle(pairs)
    return pairs


def write_rule_pairs(path: str | Path = "recipes/tiny/overoptimisation-pairs.jsonl", seed: int = 0) -> Path:
    """Write the pairs of `build_rule_pairs` to `path` (python -c "from rlhf_cli.demo import write_rule_pairs;
    write_rule_pairs()" from the repository root writes the file recipes/tiny/overoptimisation-rm.yaml reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in build_rule_pairs(seed):
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


HELDOUT_SEED = 1


def write_heldout_data(directory: str | Path, seed: int = HELDOUT_SEED, pairs: int = 128,
                       demonstrations: int = 64) -> dict[str, Path]:  # fmt: skip
    """Write heldout-preference.jsonl and heldout-sft.jsonl into `directory`, for `rlhf eval`.

    The questions are the demo task's (there are no others), but the answers are drawn with another seed, and rows
    that also occur in the training files (seed 0) are left out, so no scored pair or demonstration was trained on.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained, fresh = build_demo_rows(0), build_demo_rows(seed)
    paths = {}
    for name, split, count in (("heldout-preference", "preference", pairs), ("heldout-sft", "sft", demonstrations)):
        seen = {json.dumps(row, sort_keys=True) for row in trained[split]}
        rows = [row for row in fresh[split] if json.dumps(row, sort_keys=True) not in seen][:count]
        path = paths[name] = directory / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths


if __name__ == "__main__":  # python -m rlhf_cli.demo recipes/tiny/data
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else "recipes/tiny/data"
    for split, written in {**write_demo_data(target), **write_heldout_data(target)}.items():
        print(split, written)
