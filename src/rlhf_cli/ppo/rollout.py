"""Forward passes over (query, response) batches: policy log-probs, critic values, reward-model scores.

Layout of every batch: queries are left-padded to Lq, responses right-padded to T, concatenated as
[query | response]. The logits that predict response token t sit at position Lq - 1 + t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax


@dataclass
class Batch:
    query_ids: torch.Tensor  # (B, Lq), left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # (B, T), pad after the first EOS
    response_mask: torch.Tensor  # 1 up to and including the first EOS

    def inputs(self) -> dict[str, torch.Tensor]:
        attention_mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        # Left padding shifts positions; count them from the first real token.
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return {
            "input_ids": torch.cat([self.query_ids, self.response_ids], dim=1),
            "attention_mask": attention_mask,
            "position_ids": position_ids,
        }

    def select(self, index: torch.Tensor) -> Batch:
        return Batch(*(tensor[index] for tensor in (self.query_ids, self.query_mask, self.response_ids,
                                                    self.response_mask)))  # fmt: skip

    @property
    def last_index(self) -> torch.Tensor:
        """Index (within the response) of each response's last real token."""
        return (self.response_mask.sum(1) - 1).clamp(min=0)


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it (all 1 when there is no EOS)."""
    is_eos = response_ids == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def policy_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """log pi(a_t | s_t) of the sampled response tokens (B, T), from logits / temperature; entropy optionally."""
    query_length = batch.query_ids.shape[1]
    logits = model(**batch.inputs(), use_cache=False).logits[:, query_length - 1 : -1] / temperature
    logprobs = selective_log_softmax(logits, batch.response_ids)
    return (logprobs, entropy_from_logits(logits)) if with_entropy else logprobs


def _per_token_scores(model, batch: Batch) -> torch.Tensor:
    """The classifier head applied at every position (B, L): values for a critic, scores for a reward model."""
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**batch.inputs(), use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1)


def critic_values(model, batch: Batch) -> torch.Tensor:
    """V(s_t) for each response token (B, T): the critic's head on the state before token t."""
    query_length = batch.query_ids.shape[1]
    return _per_token_scores(model, batch)[:, query_length - 1 : -1]


def reward_scores(model, batch: Batch) -> torch.Tensor:
    """The reward model's score of prompt + response, read at the response's last real token (B,)."""
    query_length = batch.query_ids.shape[1]
    scores = _per_token_scores(model, batch)
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, query_length + batch.last_index]
