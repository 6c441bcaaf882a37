"""Forward passes over (query, response) batches: policy log-probs, critic values, reward-model scores.

Layout of every batch: queries are left-padded to Lq, responses right-padded to T, concatenated as
[query | response]. The logits that predict response token t sit at position Lq - 1 + t, and so does the
value V(s_t) of the state before token t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The two small reductions below are written here rather than imported from trl.trainer.utils: importing that
# module pulls in TRL's whole trainer stack (about 100 MB and several seconds) for two lines of arithmetic.


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] = logits[token] - logsumexp(logits), without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v = logsumexp(logits) - sum_v p_v logits_v, per position."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def disable_dropout(model: torch.nn.Module) -> None:
    """p = 0 in every dropout layer: PPO's ratio compares two forward passes of the same weights, which must agree."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


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

    def response_slice(self, per_position: torch.Tensor) -> torch.Tensor:
        """The entries of a (B, Lq + T, ...) tensor at the positions that predict / evaluate response tokens."""
        return per_position[:, self.query_ids.shape[1] - 1 : -1]


def response_mask_from(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 for tokens up to and including the first EOS, 0 after it (all 1 when there is no EOS)."""
    is_eos = response_ids == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


def head_on_every_position(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's head applied at every position (B, L): values for a critic, scores for a reward model.

    Runs the backbone and the `score` head directly: the classifier's own forward keeps only the last position.
    """
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(**inputs, use_cache=False).last_hidden_state
    return model.score(hidden).squeeze(-1)


class PolicyAndCritic(torch.nn.Module):
    """The two trainable models as one module. accelerate and DeepSpeed then run one engine with one optimizer (a
    parameter group each, so the critic keeps its own learning rate), ZeRO-3 shards both, and one backward pass
    serves the combined PPO loss."""

    def __init__(self, policy, critic):
        super().__init__()
        self.policy = policy
        self.critic = critic

    @property
    def config(self):  # what DeepSpeed/accelerate helpers read (hidden size)
        return self.policy.config

    def forward(self, input_ids, attention_mask, position_ids):
        """Policy logits (B, L, V) and critic values (B, L) of the same sequences."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self.policy(**inputs, use_cache=False).logits
        return logits, head_on_every_position(self.critic, inputs)

    def parameter_groups(self) -> tuple[list, list]:
        return list(self.policy.parameters()), list(self.critic.parameters())


class LoraPolicyAndCritic(torch.nn.Module):
    """LoRA mode: one frozen base model carries two adapters, "policy" and "critic" (the critic reads the base's last
    hidden state through its adapter into a value head), and the reference policy is the base with adapters off.
    One full copy of the weights instead of three."""

    ADAPTERS = ("policy", "critic")

    def __init__(self, base, lora_config):
        from peft import get_peft_model

        super().__init__()
        self.body = get_peft_model(base, lora_config, adapter_name="policy")
        self.body.add_adapter("critic", lora_config)
        self.value_head = torch.nn.Linear(base.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no critic opinion before training
        torch.nn.init.zeros_(self.value_head.bias)
        self._adapter_parameters = [p for name, p in self.body.named_parameters() if "lora_" in name]
        self._use("policy")

    @property
    def config(self):
        return self.body.config

    def _use(self, adapter: str):
        """Route the forward pass through one adapter. peft's set_adapter also freezes the other adapter; both
        train together here, so their gradients are switched back on."""
        self.body.set_adapter(adapter)
        for parameter in self._adapter_parameters:
            parameter.requires_grad_(True)
        return self.body

    @property
    def policy(self):
        """The policy for generation: the base with the policy adapter active."""
        return self._use("policy")

    def forward(self, input_ids, attention_mask, position_ids):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        logits = self._use("policy")(**inputs, use_cache=False).logits
        hidden = self._use("critic")(**inputs, use_cache=False, output_hidden_states=True).hidden_states[-1]
        self._use("policy")
        return logits, self.value_head(hidden).squeeze(-1)

    def reference_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.body.disable_adapter():
            return self.body(**inputs, use_cache=False).logits

    def parameter_groups(self) -> tuple[list, list]:
        policy, critic = [], [*self.value_head.parameters()]
        for name, parameter in self.body.named_parameters():
            if ".policy." in name:
                policy.append(parameter)
            elif ".critic." in name:
                critic.append(parameter)
        return policy, critic


def response_logprobs(logits: torch.Tensor, batch: Batch, temperature: float, with_entropy: bool = False):
    """log pi(a_t | s_t) of the sampled response tokens (B, T), from logits / temperature; entropy optionally."""
    logits = batch.response_slice(logits) / temperature
    logprobs = token_logprobs(logits, batch.response_ids)
    return (logprobs, entropy(logits)) if with_entropy else logprobs


def policy_logprobs(model, batch: Batch, temperature: float) -> torch.Tensor:
    """Response log-probs under a causal LM on its own (the frozen reference)."""
    return response_logprobs(model(**batch.inputs(), use_cache=False).logits, batch, temperature)


def reward_scores(model, batch: Batch) -> torch.Tensor:
    """The reward model's score of prompt + response, read at the response's last real token (B,)."""
    query_length = batch.query_ids.shape[1]
    scores = head_on_every_position(model, batch.inputs())
    rows = torch.arange(scores.shape[0], device=scores.device)
    return scores[rows, query_length + batch.last_index]
