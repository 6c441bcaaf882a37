"""Sampling, scoring and log-probabilities: the one home of what `rlhf generate`, `rlhf eval` and `rlhf label`
(its candidates, its judge and scorers) do with models outside training.

    load_causal_lm / load_scorer    a policy and its tokenizer; a reward model (read as its rendering.json says) or a
                                    rule, every check done before anything is written
    sample                          responses in seeded, left-padded batches (common random numbers across models)
    score                           (prompt, response) pairs by a reward model or a rule
    sequence_logprobs               log pi(response | query) summed over the response (perplexity, KL, DPO rewards)

PPO's rollout (`rlhf_cli.ppo.rollout`) keeps its own generation: it runs inside the training engines (ZeRO-3
gathers, the policy+critic module, LoRA adapters) and returns the per-token tensors the loss needs.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rlhf_cli.errors import UserError
from rlhf_cli.recipe import GenerationSpec, ModelSpec, RewardSpec, SamplingSpec

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------- loading


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_architecture(path: str, kind: str, what: str) -> None:
    """A reward model where a policy belongs (or the reverse) loads with a freshly initialised head and gives
    meaningless numbers without any error; say so before loading it."""
    from transformers import AutoConfig

    try:
        architectures = AutoConfig.from_pretrained(path).architectures or []
    except (OSError, ValueError):
        return  # no config to read (an adapter directory, say): loading will tell
    if not architectures:
        return
    if kind == "reward":
        fits = any(name.endswith("ForSequenceClassification") for name in architectures)
        wanted = "a reward model (a sequence classifier, as `rlhf train-rm` saves)"
    else:
        fits = any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in architectures)
        wanted = "a causal language model (as `rlhf sft` or `rlhf ppo` saves)"
    if not fits:
        raise UserError(f"{what} ({path}) is a {', '.join(architectures)}, but it must be {wanted}.")


def companion_spec(spec: ModelSpec | None, path: str) -> ModelSpec:
    """The ModelSpec of another model of the run (reference, reward model): the policy's dtype and loading flags."""
    if spec is None:
        return ModelSpec(name_or_path=path)
    return spec.model_copy(update={"name_or_path": path, "revision": None, "gguf_file": None, "tokenizer": None,
                                   "chat_template": None, "lora": None})  # fmt: skip


def load_causal_lm(spec: ModelSpec, seed: int, what: str, *, conversational: bool, tokenizer=None):
    """(model, tokenizer) ready for inference on this machine's device. With `tokenizer` given (the policy's, for
    the reference model) the model is loaded against it."""
    from rlhf_cli.models import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(spec, seed)
    check_architecture(path, "causal_lm", what)
    if tokenizer is None:
        tokenizer = load_tokenizer(spec, path, conversational=conversational)
    model = load_model(spec, path, "causal_lm", tokenizer)
    return model.eval().to(device()), tokenizer


@dataclass
class Scorer:
    """A reward: a reward model (with its own tokenizer) or a rule function `fn(prompts, completions) -> floats`."""

    name: str
    what: str  # the recipe key, for messages
    model: object = None
    tokenizer: object = None
    rule: object = None
    reads_policy_ids: bool = False  # no rendering.json, and the policy's tokenizer: score the sampled ids as they are
    reader: object = None  # rlhf_cli.rendering.RewardReader: how the reward model reads text (recorded or assumed)
    # An ensemble (several reward models, rlhf_cli.rewards.combine_scores): its members, how their scores combine,
    # and each member's scores of the last `score` call.
    members: list[Scorer] | None = None
    combine: str = "mean"
    std_coef: float = 1.0
    member_scores: list[list[float]] | None = None


def load_scorer(spec: RewardSpec, what: str, policy_spec: ModelSpec | None, policy_tokenizer, *,
                conversational: bool, model_key: str | None = None, max_length: int | None = None,
                assumed_max_length: int = 512) -> Scorer:  # fmt: skip
    """Import the rule, or load the reward model and its tokenizer; everything checked here, before any output.
    `what` is the recipe section (messages name `what.function` / `what.model`, or `model_key` when given).

    A reward model saved by `rlhf train-rm` reads text as its rendering.json says (rlhf_cli.rendering), cut at its
    training max_length unless `max_length` (a limit the recipe sets) is given; one without the record is assumed
    to read the data's own style, cut at `assumed_max_length`, and a note says so."""
    if spec.function:
        from rlhf_cli.rewards import load_rule_reward

        rule = load_rule_reward(spec.function, f"{what}.function")
        return Scorer(name=spec.function, what=f"{what}.function", rule=rule)
    from rlhf_cli.rewards import reward_model_paths

    key = model_key or f"{what}.model"
    paths = reward_model_paths(spec, what)
    if len(paths) > 1:  # an ensemble: every member loaded (and checked) as a reward model of its own
        members = [load_scorer(RewardSpec(model=path), what, policy_spec, policy_tokenizer, conversational=conversational,
                               model_key=f"{key}[member {index}]", max_length=max_length,
                               assumed_max_length=assumed_max_length) for index, path in enumerate(paths)]  # fmt: skip
        first = members[0]
        return Scorer(name=spec.model or ", ".join(paths), what=key, model=first.model, tokenizer=first.tokenizer,
                      reader=EnsembleReader(members, spec.combine_how, spec.coef), members=members,
                      combine=spec.combine_how, std_coef=spec.coef)  # fmt: skip
    from rlhf_cli.models import load_model, load_tokenizer, tokenizer_mismatch
    from rlhf_cli.rendering import (
        RENDERING_FILE,
        assumed_rendering,
        make_reader,
        missing_record_note,
        print_note,
        read_rendering,
    )

    model_spec = companion_spec(policy_spec, spec.model)
    check_architecture(spec.model, "reward", key)
    rendering = read_rendering(spec.model)
    tokenizer = load_tokenizer(model_spec, spec.model, conversational=conversational)
    model = load_model(model_spec, spec.model, "reward", tokenizer).eval().to(device())
    if rendering is None:
        rendering = assumed_rendering(tokenizer, conversational=conversational, max_length=assumed_max_length)
        print_note(missing_record_note(key, spec.model, rendering))
        max_length = assumed_max_length
    elif max_length is not None and max_length != rendering.max_length:
        print_note(f"{key} ({spec.model}) was trained on pairs cut to {rendering.max_length} tokens ({RENDERING_FILE});"
                   f" the recipe's max_length cuts them at {max_length} instead.")  # fmt: skip
    reader = make_reader(rendering, tokenizer, model, max_length=max_length)
    reads_policy_ids = (not rendering.recorded and policy_tokenizer is not None
                        and tokenizer_mismatch(policy_tokenizer, tokenizer) is None)  # fmt: skip
    return Scorer(name=spec.model, what=key, model=model, tokenizer=tokenizer, reads_policy_ids=reads_policy_ids,
                  reader=reader)  # fmt: skip


class EnsembleReader:
    """Reads text as member 0 reads it (a `rlhf train-rm` ensemble's members share their rendering.json) and scores
    with every member, combined by `rlhf_cli.rewards.combine_scores`: what `rlhf eval` scores pairs with."""

    def __init__(self, members: list[Scorer], combine: str, std_coef: float):
        self.members, self.combine, self.std_coef = members, combine, std_coef
        self.first = members[0].reader
        self.rendering, self.max_length = self.first.rendering, self.first.max_length

    def __getattr__(self, name):  # encode_pair, cut, note, ...: member 0's
        return getattr(self.first, name)

    def _combined(self, per_member: list[list[float]]) -> list[float]:
        from rlhf_cli.rewards import combine_scores

        return combine_scores(per_member, self.combine, self.std_coef)

    def score_sequences(self, model, sequences, device, batch_size):
        return self._combined([member.reader.score_sequences(member.model, sequences, member.model.device, batch_size)
                               for member in self.members])  # fmt: skip

    def score_responses(self, model, prompts, texts, device, batch_size):
        return self._combined([member.reader.score_responses(member.model, prompts, texts, member.model.device,
                                                             batch_size) for member in self.members])  # fmt: skip


# ---------------------------------------------------------------- prompts and batches


def choose_prompts(total: int, num_prompts: int | None, seed: int) -> list[int]:
    """Indices of the prompts to answer: all, or a seeded random subset of `num_prompts`, in file order."""
    if num_prompts is None or num_prompts >= total:
        return list(range(total))
    return sorted(random.Random(seed).sample(range(total), num_prompts))


def positions_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def prompt_budget(model, sampling: SamplingSpec) -> int:
    """Prompt tokens kept: max_prompt_length, and room left for max_new_tokens within the model's positions."""
    limit = positions_limit(model)
    if limit is None:
        return sampling.max_prompt_length
    return max(1, min(sampling.max_prompt_length, limit - sampling.max_new_tokens))


def to_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int, where):
    """The rollout layout of `rlhf_cli.ppo.rollout.Batch`: left-padded queries, right-padded responses."""
    import torch

    from rlhf_cli.ppo.rollout import Batch
    from rlhf_cli.ppo.trainer import left_pad

    query_ids, query_mask = left_pad(queries, pad_id, where)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    for row, tokens in enumerate(responses):
        response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        response_mask[row, : len(tokens)] = 1
    return Batch(query_ids, query_mask, response_ids.to(where), response_mask.to(where))


def chunks(rows: int, size: int) -> list[range]:
    return [range(start, min(start + size, rows)) for start in range(0, rows, size)]


def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[blue]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn())  # fmt: skip


# ---------------------------------------------------------------- sampling and scoring


@dataclass
class Responses:
    """Sampled responses, one per query, in query order."""

    queries: list[list[int]] = field(default_factory=list)  # the prompt tokens the model saw
    tokens: list[list[int]] = field(default_factory=list)  # response tokens up to and including the first EOS
    texts: list[str] = field(default_factory=list)  # decoded, special tokens left out
    finished: list[bool] = field(default_factory=list)  # ended with EOS rather than at max_new_tokens
    decoding: str = "hf"  # the backend that decoded them (rlhf_cli.generation.backend_line)


def sample(model, tokenizer, queries: list[list[int]], sampling: SamplingSpec, seed: int, progress=None,
           label: str = "sampling", generation: GenerationSpec | None = None) -> Responses:  # fmt: skip
    """Sample one response per query in batches of `sampling.batch_size`, decoded by the recipe's
    `generation.backend` (rlhf_cli.generation).

    Batch k is sampled after torch.manual_seed(seed + k), so two models given the same queries and seed draw the
    same random numbers (common random numbers: a model compared with itself ties on every prompt). A vLLM engine
    draws its own random numbers: there the comparison holds only on average.
    """
    import torch

    from rlhf_cli.generation import Decoder, backend_line, resolve_backend, sampling_options
    from rlhf_cli.ppo.rollout import response_mask_from
    from rlhf_cli.ppo.trainer import left_pad

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    options = sampling_options(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, pad_id=pad, eos_id=eos)  # fmt: skip
    decoder = Decoder(resolve_backend(generation, model, what=label), batch_size=sampling.batch_size)
    if decoder.name == "vllm":
        from accelerate import Accelerator

        longest = max((len(query) for query in queries), default=1) + sampling.max_new_tokens
        decoder.vllm_engine(model, Accelerator(), tokenizer, options, max_model_length=longest)
    out = Responses(decoding=backend_line(decoder))
    task = progress.add_task(label, total=len(queries)) if progress is not None else None
    for number, rows in enumerate(chunks(len(queries), sampling.batch_size)):
        batch_queries = [queries[i] for i in rows]
        query_ids, query_mask = left_pad(batch_queries, pad, model.device)
        torch.manual_seed(seed + number)
        with torch.no_grad(), _no_padding_false_alarm():
            response_ids = decoder.generate(model, query_ids, query_mask, options)
        mask = response_mask_from(response_ids, eos).bool()
        for row, query in enumerate(batch_queries):
            tokens = response_ids[row][mask[row]].tolist()
            out.queries.append(query)
            out.tokens.append(tokens)
            out.finished.append(eos in tokens)
        out.texts.extend(tokenizer.batch_decode(out.tokens[-len(batch_queries):], skip_special_tokens=True))
        if task is not None:
            progress.advance(task, len(batch_queries))
    decoder.close()
    return out


@contextmanager
def _no_padding_false_alarm():
    """`generate` drops an all-ones attention mask (prompts of equal length), then warns "we strongly recommend
    passing in an attention_mask" once finished rows are padded. The mask was passed; silence that one logger."""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def sequence_logprobs(model, queries: list[list[int]], responses: list[list[int]], pad_id: int, batch_size: int,
                      progress=None, label: str = "log-probs") -> list[float]:  # fmt: skip
    """sum_t log p(y_t | x, y_<t) of every response under `model`, at temperature 1 (the model's own
    distribution, whatever temperature the responses were sampled at)."""
    import torch

    from rlhf_cli.ppo.rollout import policy_logprobs

    sums: list[float] = []
    task = progress.add_task(label, total=len(queries)) if progress is not None else None
    for rows in chunks(len(queries), batch_size):
        batch = to_batch([queries[i] for i in rows], [responses[i] for i in rows], pad_id, model.device)
        with torch.no_grad():
            logprobs = policy_logprobs(model, batch, 1.0)
        sums.extend((logprobs * batch.response_mask).sum(1).tolist())
        if task is not None:
            progress.advance(task, len(rows))
    return sums


def score(scorer: Scorer, prompts: list, responses: Responses, *, max_prompt_length: int, batch_size: int,
          progress=None, label: str = "scoring") -> list[float]:  # fmt: skip
    """The reward of every (prompt, response).

    A reward model saved by `rlhf train-rm` reads prompt + decoded response rendered as in its training
    (rendering.json: the same template, EOS and windows, through `lengths.encode_pair`), its score read as training
    read it. A reward model without the record reads prompt + response at the response's last token, as in PPO:
    when it shares the policy's tokenizer the sampled token ids themselves, otherwise prompt and response
    re-tokenized with its own tokenizer (the prompt through its chat template), a finished response with its EOS
    back. A rule gets the prompts as in the data and the decoded responses.
    """
    if scorer.members:  # an ensemble: each member scores, the scores combine; each member's kept on the scorer
        from rlhf_cli.rewards import combine_scores

        scorer.member_scores = [score(member, prompts, responses, max_prompt_length=max_prompt_length,
                                      batch_size=batch_size, progress=progress, label=f"{label} (member {index})")
                                for index, member in enumerate(scorer.members)]  # fmt: skip
        return combine_scores(scorer.member_scores, scorer.combine, scorer.std_coef)
    task = progress.add_task(label, total=len(prompts)) if progress is not None else None
    if scorer.rule is not None:
        try:
            values = scorer.rule(list(prompts), list(responses.texts))
        except Exception as exc:  # the user's code: say whose it is, in one paragraph
            raise UserError(f"{scorer.what} {scorer.name!r} failed: {type(exc).__name__}: {exc}") from None
        values = list(values) if not isinstance(values, (str, bytes)) and hasattr(values, "__len__") else None
        if values is None or len(values) != len(prompts):
            raise UserError(f"{scorer.what} {scorer.name!r} must return one number per completion "
                            f"({len(prompts)} here).")  # fmt: skip
        try:
            values = [float(value) for value in values]
        except (TypeError, ValueError):
            raise UserError(f"{scorer.what} {scorer.name!r} returned something that is not a number.") from None
        if task is not None:
            progress.advance(task, len(prompts))
        return values

    if scorer.reader is not None and scorer.reader.rendering.recorded:
        values = []
        for rows in chunks(len(prompts), batch_size):
            values.extend(scorer.reader.score_responses(scorer.model, [prompts[i] for i in rows],
                                                        [responses.texts[i] for i in rows], scorer.model.device,
                                                        batch_size))  # fmt: skip
            if task is not None:
                progress.advance(task, len(rows))
        return values

    import torch

    from rlhf_cli.ppo.rollout import reward_scores
    from rlhf_cli.ppo.trainer import encode_prompts

    tokenizer = scorer.tokenizer
    if scorer.reads_policy_ids:
        queries, answers = responses.queries, responses.tokens
    else:
        queries = encode_prompts({"prompt": list(prompts)}, tokenizer, max_prompt_length)
        answers = []
        for text, finished in zip(responses.texts, responses.finished):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            answers.append(ids + [tokenizer.eos_token_id] if finished or not ids else ids)
    limit = positions_limit(scorer.model)
    if limit is not None:  # the reward model may read fewer positions than the policy wrote: drop prompt tokens
        queries = [query[-max(1, limit - len(answer)):] for query, answer in zip(queries, answers)]
        answers = [answer[-(limit - len(query)):] for query, answer in zip(queries, answers)]
    values: list[float] = []
    for rows in chunks(len(queries), batch_size):
        batch = to_batch([queries[i] for i in rows], [answers[i] for i in rows], tokenizer.pad_token_id,
                         scorer.model.device)  # fmt: skip
        with torch.no_grad():
            values.extend(reward_scores(scorer.model, batch).float().tolist())
        if task is not None:
            progress.advance(task, len(rows))
    return values


def completion_field(prompt, text: str):
    """The completion in the prompt's style: a message list answers a message list (TRL's conversational
    prompt/completion), text answers text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def sampling_line(spec: SamplingSpec) -> str:
    mode = "greedy" if spec.temperature == 0 else f"temperature {spec.temperature}, top_p {spec.top_p}"
    return (f"{mode}, up to {spec.max_new_tokens} new tokens, batches of "
            f"{spec.batch_size}, prompts cut to their last {spec.max_prompt_length} tokens")
