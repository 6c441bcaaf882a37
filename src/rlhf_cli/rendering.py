"""One rendering per reward model: how `rlhf train-rm` turned pairs into tokens, recorded for every later scorer.

`rlhf train-rm` tokenizes each preference pair as TRL's RewardTrainer does (`rlhf_cli.lengths.encode_pair`):

    conversational  prompt + response through the tokenizer's chat template: the model's own, the recipe's
                    `model.chat_template`, or `models.PLAIN_CHAT_TEMPLATE` ('User: ...' / 'Assistant: ...', EOS
                    closing each assistant turn) when the tokenizer has none
    text            prompt + response + EOS as one text, through the tokenizer (with its own special tokens)

It cuts a pair longer than `data.max_length` with the windows of `rlhf_cli.lengths` (the prompt's end, each
response's start, one prompt cut for both responses), and the sequence classifier reads its score at the last
token that is not the pad token. When the model is saved, `write_rendering` writes these facts as
`rendering.json` next to it:

    {"version": 1, "written_by": "rlhf train-rm", "style": "conversational" | "text",
     "chat_template": str | null,   # conversational: the template rendered with; text: null
     "eos_token": str | null, "eos_appended": bool,   # text: EOS appended to each response
     "text_layout": "hh" | null,     # text rows that were Anthropic HH transcripts ('\\n\\nHuman: ...')
     "implicit_prompt": bool,        # pairs without a prompt column (the prompt is the shared start)
     "max_length": int, "on_too_long": str, "truncation": str, "score_position": str,
     "pad_token_id": int | null, "data_format": str, "data_source": str, "tokenizer": str}

Every later scorer of that model (`rlhf eval` on pairs and on sampled responses, `rlhf generate`, PPO's reward and
judge models, the pipeline's stages) reads it back (`read_rendering`) and scores through a `RewardReader`, which
renders with the same template, EOS and windows by calling the same encoder as training
(`lengths.encode_pair`), and reads the score where training read it (the classifier's own forward on
right-padded sequences). Data in the other style is converted first: text prompts for a conversational model
become a user turn (an HH transcript its turns), conversations for a model trained on HH transcripts are written
out as transcripts; anything else is rendered as it comes, with a note. A reward model without the record (a hub
model, an older run) keeps the rendering the data implies (`assumed_rendering`), and the scorer prints one note
saying which.

Heavy imports (torch, transformers, datasets) stay inside the functions.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rlhf_cli.errors import UserError

RENDERING_FILE = "rendering.json"
VERSION = 1
TRUNCATION = ("prompt's end + each response's start (rlhf_cli.lengths.budget), one prompt cut for both responses; "
              "a prompt alone longer than max_length keeps its end")  # fmt: skip
SCORE_POSITION = "the last token that is not the pad token (the sequence classifier's own rule)"
HH_PREFIX = "\n\nHuman:"
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")  # as rlhf_cli.data reads `format: hh`


@dataclass(frozen=True)
class Rendering:
    """How one reward model reads text (the fields of rendering.json). `recorded` is False for an assumed one."""

    style: str  # "conversational" | "text"
    chat_template: str | None
    eos_token: str | None
    eos_appended: bool
    max_length: int
    on_too_long: str = "truncate"
    text_layout: str | None = None  # "hh": the text rows were HH transcripts
    implicit_prompt: bool = False
    truncation: str = TRUNCATION
    score_position: str = SCORE_POSITION
    pad_token_id: int | None = None
    data_format: str | None = None
    data_source: str | None = None
    tokenizer: str | None = None
    recorded: bool = True
    origin: str = RENDERING_FILE  # the file read, or "assumed"

    def to_json(self) -> dict:
        data = {"version": VERSION, "written_by": "rlhf train-rm", **asdict(self)}
        for key in ("recorded", "origin"):
            data.pop(key)
        return data

    @classmethod
    def from_json(cls, data: dict, origin: str) -> Rendering:
        known = {f.name for f in fields(cls)} - {"recorded", "origin"}
        values = {key: value for key, value in data.items() if key in known}
        if values.get("style") not in ("conversational", "text") or not isinstance(values.get("max_length"), int):
            raise ValueError("it needs a style (conversational or text) and an integer max_length")
        return cls(**values, recorded=True, origin=origin)

    @property
    def conversational(self) -> bool:
        return self.style == "conversational"

    def template_name(self) -> str:
        from rlhf_cli.models import describe_chat_template

        return describe_chat_template(self.chat_template)

    def describe(self, *, cut: bool = True) -> str:
        """One line: how prompt + response become tokens and, with `cut`, where they are cut and the score read."""
        if self.conversational:
            how = f"conversational: prompt + response through {self.template_name()}"
        else:
            layout = " (HH transcripts)" if self.text_layout == "hh" else ""
            eos = f" + EOS {self.eos_token!r}" if self.eos_appended and self.eos_token else ""
            how = f"text{layout}: prompt + response{eos}"
        if not cut:
            return how
        window = f"cut to {self.max_length} tokens (prompt's end, response's start)"
        return f"{how}; {window}; score at the last non-pad token"


# ---------------------------------------------------------------- writing and reading the record


def rendering_for_training(recipe, tokenizer, row: dict | None, data_format: str | None) -> Rendering:
    """The rendering `rlhf train-rm` used for `recipe` with `tokenizer` (its training tokenizer), given a pair of
    its data as loaded (`row`) and the format read."""
    conversational = isinstance(row["chosen"], list) if row is not None else bool(tokenizer.chat_template)
    layout = None
    if row is not None and not conversational and ((row.get("prompt") or "") + row["chosen"]).startswith(HH_PREFIX):
        layout = "hh"
    source = recipe.data.train
    return Rendering(
        style="conversational" if conversational else "text",
        chat_template=tokenizer.chat_template if conversational else None,
        eos_token=tokenizer.eos_token,
        eos_appended=not conversational,
        max_length=recipe.data.max_length,
        on_too_long=recipe.data.on_too_long,
        text_layout=layout,
        implicit_prompt=row is not None and not row.get("prompt"),
        pad_token_id=tokenizer.pad_token_id,
        data_format=data_format or source.format,
        data_source=source.path or source.name,
        tokenizer=recipe.model.tokenizer or recipe.model.name_or_path,
    )


def write_rendering(run_dir, recipe, tokenizer, row: dict | None, data_format: str | None) -> Path:
    """Write rendering.json for a reward model `rlhf train-rm` trained with `tokenizer` on `recipe`'s data, given
    one pair of that data as loaded (`row`) and the format the loader read."""
    rendering = rendering_for_training(recipe, tokenizer, row, data_format)
    path = Path(run_dir) / RENDERING_FILE
    path.write_text(json.dumps(rendering.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_rendering(model_path: str | None) -> Rendering | None:
    """The record saved with the reward model at `model_path` (a directory), or None when there is none."""
    if not model_path:
        return None
    path = Path(model_path).expanduser() / RENDERING_FILE
    if not path.is_file():
        return None
    try:
        return Rendering.from_json(json.loads(path.read_text(encoding="utf-8")), str(path))
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a rendering record `rlhf train-rm` wrote ({exc}); delete it to score the "
                        "model with the rendering its data implies, or retrain it.") from None  # fmt: skip


def assumed_rendering(tokenizer, *, conversational: bool, max_length: int) -> Rendering:
    """For a reward model without a record: the data's own style, the tokenizer's template (or the plain one),
    EOS after a text response, cut at `max_length`."""
    return Rendering(style="conversational" if conversational else "text",
                     chat_template=tokenizer.chat_template if conversational else None, eos_token=tokenizer.eos_token,
                     eos_appended=not conversational, max_length=max_length, pad_token_id=tokenizer.pad_token_id,
                     recorded=False, origin="assumed")  # fmt: skip


def missing_record_note(what: str, path: str, rendering: Rendering) -> str:
    return (f"{what} ({path}) has no {RENDERING_FILE} (it was not saved by `rlhf train-rm`), so it is assumed to read "
            f"{rendering.describe(cut=False)}.")  # fmt: skip


def print_note(message: str) -> None:
    """A yellow `Note:` line on stderr (once, on the main process of a distributed run)."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    from rich.markup import escape

    from rlhf_cli.console import make_console

    make_console(stderr=True, soft_wrap=True).print(f"[yellow]Note:[/] {escape(message)}", highlight=False)


# ---------------------------------------------------------------- HH transcripts <-> messages


def hh_transcript(messages: list[dict]) -> str:
    """Messages as an Anthropic HH transcript: '\\n\\nHuman: ...\\n\\nAssistant: ...' (what `format: hh` parses)."""
    speaker = {"user": "Human", "assistant": "Assistant"}
    return "".join(f"\n\n{speaker.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def hh_messages(text: str) -> list[dict] | None:
    """An HH transcript as messages (as `format: hh` reads it; a trailing empty Assistant turn, the cue to answer,
    left out), or None when `text` is no transcript."""
    if not text.startswith(HH_PREFIX):
        return None
    parts = _HH_MARKER.split(text)
    messages = [{"role": "user" if who == "Human" else "assistant", "content": body.removeprefix(" ")}
                for who, body in zip(parts[1::2], parts[2::2])]  # fmt: skip
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():
        messages.pop()
    return messages or None


# ---------------------------------------------------------------- reading text as the reward model was trained to


@dataclass
class RewardReader:
    """Renders (prompt, response) for one reward model by its Rendering and scores it as training read it."""

    rendering: Rendering
    tokenizer: Any
    max_length: int  # the windows: the record's max_length (or eval.max_length when set), within the positions
    pad_id: int

    # ------------------------------------------------------------ style

    def note(self, conversational_data: bool, what: str) -> str | None:
        """One line when `what` (a data source) is in the other style from the model's training, saying how it
        is read; None when the styles agree or the rendering is assumed."""
        r = self.rendering
        if not r.recorded or conversational_data == r.conversational:
            return None
        name = f"the reward model ({r.origin})"
        if r.conversational:
            return (f"{what} is plain text but {name} was trained on conversations: each prompt is read as one user "
                    f"turn (an HH transcript as its turns) and each response as the assistant's, through "
                    f"{r.template_name()}.")  # fmt: skip
        if r.text_layout == "hh":
            return (f"{what} is conversational but {name} was trained on HH transcripts: the turns are written out "
                    "as '\\n\\nHuman: ...\\n\\nAssistant: ...' text, as in training.")  # fmt: skip
        return (f"{what} is conversational but {name} was trained on plain text: the turns are rendered through "
                f"{self._template_name()}, a layout it never saw in training.")  # fmt: skip

    def _template_name(self) -> str:
        from dataclasses import replace

        return replace(self.rendering, chat_template=self.tokenizer.chat_template).template_name()

    def _styled(self, prompt, responses: list) -> tuple[Any, list]:
        """(prompt, responses) in the style the model was trained on, where a faithful conversion exists."""
        r = self.rendering
        conversational = isinstance(responses[0], list) or isinstance(prompt, list)
        if not r.recorded or conversational == r.conversational:
            return prompt, responses
        if r.conversational:  # text -> messages
            if prompt:
                turns = hh_messages(prompt) or [{"role": "user", "content": prompt}]
                return turns, [[{"role": "assistant", "content": text.removeprefix(" ")}] for text in responses]
            parsed = [hh_messages(text) for text in responses]
            if all(parsed):  # whole transcripts (an implicit prompt)
                return None, parsed
            return prompt, responses
        if r.text_layout == "hh":  # messages -> HH transcripts
            head = hh_transcript(prompt or [])
            if r.implicit_prompt and len(responses) > 1:
                return None, [head + hh_transcript(turns) for turns in responses]
            if responses[0] and responses[0][0]["role"] == "assistant":
                cue = "\n\nAssistant:"
                return head + cue, [hh_transcript(turns)[len(cue):] for turns in responses]
            return head, [hh_transcript(turns) for turns in responses]
        return prompt, responses

    # ------------------------------------------------------------ tokens

    def encode_pair(self, row: dict):
        """A preference row as training tokenized it (`lengths.Encoded`: chosen and rejected, uncut)."""
        from rlhf_cli.lengths import encode_pair

        prompt, (chosen, rejected) = self._styled(row.get("prompt"), [row["chosen"], row["rejected"]])
        styled = {"chosen": chosen, "rejected": rejected}
        if prompt:
            styled["prompt"] = prompt
        return encode_pair(self.tokenizer, styled)

    def encode_response(self, prompt, response: str):
        """One sampled response to `prompt` (as in the data), tokenized as training tokenized a chosen response.
        Answering a conversation it becomes the assistant's message, less the one space a model writes after a
        generation prompt such as 'Assistant:' (a message's content does not start with it)."""
        from rlhf_cli.lengths import Encoded

        answer: str | list = response
        if isinstance(prompt, list):
            answer = [{"role": "assistant", "content": response.removeprefix(" ")}]
        encoded = self.encode_pair({"prompt": prompt, "chosen": answer, "rejected": answer})
        return Encoded(encoded.sequences[:1], encoded.boundary)

    def cut(self, encoded) -> list[list[int]]:
        """The token ids kept of each sequence: training's windows at `max_length`."""
        from rlhf_cli.lengths import windows

        spans = windows([len(ids) for ids in encoded.sequences], encoded.boundary, self.max_length)
        return [ids[start:stop] for ids, (start, stop) in zip(encoded.sequences, spans)]

    # ------------------------------------------------------------ scores

    def score_sequences(self, model, sequences: list[list[int]], device, batch_size: int = 16) -> list[float]:
        """The classifier's score of each token sequence, read as in training: right-padded with the pad token,
        the model's own forward, which reads the last token that is not the pad token."""
        import torch

        values: list[float] = []
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                               use_cache=False).logits  # fmt: skip
            values.extend(logits[:, 0].float().tolist())
        return values

    def score_responses(self, model, prompts: list, responses: list[str], device, batch_size: int = 16) -> list[float]:
        """Scores of (prompt, response) pairs: prompts as in the data, responses as decoded text."""
        sequences = [self.cut(self.encode_response(prompt, text))[0] for prompt, text in zip(prompts, responses)]
        return self.score_sequences(model, sequences, device, batch_size)


def make_reader(rendering: Rendering, tokenizer, model, *, max_length: int | None = None) -> RewardReader:
    """A RewardReader for `model`: the record's chat template set on `tokenizer` (the reward model's own, which
    this changes), windows at `max_length` (default: the record's) within the model's positions, and the model's
    pad token id (what its classifier skips)."""
    from rlhf_cli.models import PLAIN_CHAT_TEMPLATE

    if rendering.recorded and rendering.conversational and rendering.chat_template:
        tokenizer.chat_template = rendering.chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE  # for conversations shown to a model trained on text
    limit = max_length or rendering.max_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions:
        limit = min(limit, positions)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RewardReader(rendering, tokenizer, limit, pad)


def reward_tokenizer(model_path: str, fallback):
    """The tokenizer saved with a reward model (with a pad token), or a copy of `fallback` when none is saved."""
    import copy

    from rlhf_cli.models import read_tokenizer

    try:
        tokenizer = read_tokenizer(model_path)
    except UserError:
        tokenizer = copy.deepcopy(fallback)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
