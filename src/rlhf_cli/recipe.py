"""The YAML recipe: pydantic models, loading, `--set` overrides, path resolution and validation.

Nothing here imports torch, transformers or trl: a bad recipe must fail in well under a second.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from rlhf_cli.errors import UserError
from rlhf_cli.trl_fields import check_training_keys

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("builtin:tiny-gpt2",)


class _Strict(BaseModel):
    # strict: "yes" is not a boolean and "3" not a number; a recipe says what it means
    model_config = ConfigDict(extra="forbid", strict=True)


class LoraSpec(_Strict):
    """LoRA adapters through peft. The trained adapter is saved; `merge: true` also saves merged full weights."""

    r: PositiveInt = Field(16, description="Rank of the low-rank update.")
    alpha: PositiveInt = Field(32, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'."
    )
    merge: bool = Field(
        False,
        description="After training, merge the adapter into the base weights and save a full model in "
        "output_dir (the adapter alone goes to output_dir/adapter).",
    )


class BuiltinSpec(_Strict):
    """Shape of the locally built random-init GPT-2 used by `builtin:tiny-gpt2` (no download)."""

    n_layer: PositiveInt = Field(2, description="Transformer blocks.")
    n_embd: PositiveInt = Field(64, description="Hidden width.")
    n_head: PositiveInt = Field(2, description="Attention heads (must divide n_embd).")
    n_positions: PositiveInt = Field(512, description="Maximum sequence length (at least data.max_length).")
    vocab_size: PositiveInt = Field(
        1024, description="Size of the byte-level BPE the project trains on its demo corpus."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> BuiltinSpec:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide n_embd ({self.n_embd})")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes plus merges and special tokens)")
        return self


class ModelSpec(_Strict):
    name_or_path: str = Field(
        description="Hub id (e.g. 'Qwen/Qwen2.5-0.5B'), a local directory, or 'builtin:tiny-gpt2' "
        "(a random-init GPT-2 and tokenizer built locally, no download)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    gguf_file: str | None = Field(None, description="Name of a .gguf file inside name_or_path to load (dequantized).")
    tokenizer: str | None = Field(None, description="Tokenizer hub id or directory, when not the model's own.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' keeps the checkpoint's dtype (float32 for builtin models)."
    )
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'eager', 'flash_attention_2'.")
    trust_remote_code: bool = Field(False, description="Run model code from the hub. Only enable for code you trust.")
    chat_template: str | None = Field(
        None,
        description="Jinja chat template, or a path to a .jinja file; overrides the tokenizer's. A tokenizer "
        "without a template gets a plain 'User:/Assistant:' one.",
    )
    builtin: BuiltinSpec = Field(default_factory=BuiltinSpec, description="Shape of builtin:* models.")
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")

    @model_validator(mode="after")
    def _known_builtin(self) -> ModelSpec:
        if self.name_or_path.startswith(BUILTIN_PREFIX) and self.name_or_path not in BUILTIN_MODELS:
            raise ValueError(
                f"unknown builtin model {self.name_or_path!r}; available: {', '.join(BUILTIN_MODELS)}"
            )
        return self

    @property
    def is_builtin(self) -> bool:
        return self.name_or_path.startswith(BUILTIN_PREFIX)


DataFormat = Literal[
    "auto", "text", "prompt_completion", "messages", "preference", "alpaca", "sharegpt", "hh", "ranked", "candidates"
]
LabelValue = int | float | str | None


class WinnerSpec(_Strict):
    """Two responses and a label column saying which is better (AlpacaEval/AlpacaFarm: preference 1, 2 or 0).

    Read as preference pairs: chosen is the winner. Labels compare as numbers where they look like numbers
    (1, 1.0 and "1" agree). Tie and skip rows are left out and counted; any other label is an error.
    """

    column: str = Field(description="Column (or dotted path) holding the label, e.g. preference.")
    responses: list[str] = Field(
        description="The two response columns (or paths), first then second, e.g. [output_1, output_2]."
    )
    first: list[LabelValue] = Field(description="Label value(s) meaning the first response is better, e.g. 1.")
    second: list[LabelValue] = Field(description="Label value(s) meaning the second response is better, e.g. 2.")
    tie: list[LabelValue] = Field(default_factory=list, description="Label value(s) meaning a tie, e.g. 0.")
    skip: list[LabelValue] = Field(
        default_factory=list, description="Other label values whose rows are left out, e.g. -1 or null (counted)."
    )

    @model_validator(mode="before")
    @classmethod
    def _values_as_lists(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {key: [value] if key in ("first", "second", "tie", "skip") and not isinstance(value, list)
                    else value for key, value in data.items()}  # fmt: skip
        return data

    @model_validator(mode="after")
    def _values_distinct(self) -> WinnerSpec:
        from rlhf_cli.data import normalize_label

        if len(self.responses) != 2 or self.responses[0] == self.responses[1]:
            raise ValueError(f"responses must name two different columns, got {self.responses}")
        seen: dict[Any, str] = {}
        for name in ("first", "second", "tie", "skip"):
            values = getattr(self, name)
            if name in ("first", "second") and not values:
                raise ValueError(f"{name} needs at least one label value")
            for value in values:
                key = normalize_label(value)
                if key in seen and seen[key] != name:
                    raise ValueError(f"label {value!r} is listed under both {seen[key]} and {name}")
                seen[key] = name
        return self


class RankingSpec(_Strict):
    """One prompt with several responses, each with a rank or a score (OpenAssistant-like).

    Read as preference pairs, the best response against each other one; ties with the best are skipped and counted.
    """

    responses: str = Field(
        "responses", description="Column (or dotted path) holding the list of responses: mappings or strings."
    )
    text: str = Field("text", description="Key of a response's text inside each response mapping.")
    rank: str = Field("rank", description="Key of a response's rank or score inside each response mapping.")
    rank_column: str | None = Field(
        None, description="Column (or path) with a list of ranks or scores, one per response, instead of a key "
        "inside each response (for plain-string responses)."
    )
    better: Literal["lower", "higher"] = Field(
        description="lower: rank 1 is best (OpenAssistant ranks); higher: the highest score is best."
    )


class DataSource(_Strict):
    path: str | None = Field(None, description="Local .jsonl/.json/.parquet/.csv file (or a directory of them).")
    name: str | None = Field(None, description="Hub dataset name, e.g. 'trl-lib/Capybara'.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    format: DataFormat = Field(
        "auto",
        description="auto | text | prompt_completion | messages | preference | alpaca | sharegpt | hh | ranked. "
        "'auto' detects from the columns.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Names the format expects -> source columns or dotted paths into nested data, e.g. "
        "{prompt: question, completion: answer} or {input: instances.0.input}.",
    )
    prompt_template: str | None = Field(
        None,
        description="Build the prompt from several fields, e.g. '{instruction}\\n\\n{input}' (fields may be dotted "
        "paths); a paragraph whose fields are all empty is left out.",
    )
    winner: WinnerSpec | None = Field(
        None, description="Two response columns and a label column saying which won (e.g. AlpacaEval's preference)."
    )
    ranking: RankingSpec | None = Field(
        None, description="Several ranked or scored responses per prompt, read as pairs (format: ranked)."
    )
    limit: PositiveInt | None = Field(None, description="Use only the first N rows.")

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if (self.path is None) == (self.name is None):
            raise ValueError("give exactly one of 'path' (local file) or 'name' (hub dataset)")
        return self

    @model_validator(mode="after")
    def _layout_keys_agree(self) -> DataSource:
        from rlhf_cli.data import template_fields

        if self.prompt_template is not None:
            if "prompt" in self.columns:
                raise ValueError("prompt_template builds the prompt: remove columns.prompt, or the template")
            try:
                template_fields(self.prompt_template)
            except ValueError as exc:
                raise ValueError(f"prompt_template: {exc}") from None
        if self.winner is not None:
            if {"chosen", "rejected"} & set(self.columns):
                raise ValueError("winner makes chosen and rejected: remove columns.chosen/columns.rejected")
            if self.ranking is not None:
                raise ValueError("give winner (two responses and a label) or ranking (ranked responses), not both")
        if self.ranking is not None and self.format not in ("auto", "ranked"):
            raise ValueError(f"ranking is read by format ranked, not {self.format!r}; set format: ranked or auto")
        if self.ranking is not None and "responses" in self.columns:
            raise ValueError("ranking names the responses: remove columns.responses and set ranking.responses")
        if self.format == "ranked" and self.ranking is None:
            raise ValueError("format ranked needs a ranking section, at least ranking.better (lower or higher)")
        return self


class DataSpec(_Strict):
    train: DataSource = Field(description="Training data.")
    eval: DataSource | None = Field(None, description="Evaluation data (optional).")
    max_length: PositiveInt = Field(
        512, description="Longest example in tokens as the trainer reads it (prompt + response, chat template "
        "applied; a PPO prompt alone). What happens to a longer one: on_too_long."
    )
    on_too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="truncate: keep the prompt's end and each response's start (a text row keeps its "
        "start); drop: leave such rows out (counted in the summary); error: stop before training, naming the first."
    )
    eval_split: float | int | None = Field(
        None, description="Hold out part of data.train as evaluation data, picked by `seed`: a fraction in "
        "(0, 0.5] or a number of rows; 0 holds out nothing. null: the stage's default (train-rm: 5%, 8 to 1000 "
        "rows, when there is no data.eval; sft: none)."
    )

    @field_validator("eval_split", mode="before")
    @classmethod
    def _eval_split_range(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("must be a fraction in (0, 0.5], a number of rows, or 0 to hold out nothing")
        if isinstance(value, float) and not (0 < value <= 0.5 or value == 0):
            raise ValueError("a fraction must be in (0, 0.5] (a whole number is a number of rows; 0 holds out "
                             "nothing)")  # fmt: skip
        if isinstance(value, int) and value < 0:
            raise ValueError("a number of rows must be 0 (hold out nothing) or more")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataSpec:
        if self.eval is not None and self.eval_split:
            raise ValueError("give data.eval or data.eval_split, not both (eval_split holds out part of data.train "
                             "as the evaluation data; 0 turns it off)")  # fmt: skip
        return self


class DistributedSpec(_Strict):
    strategy: Literal["none", "ddp", "zero2", "zero3"] = Field(
        "none", description="none trains in this process; others re-launch under `accelerate launch`."
    )
    offload: Literal["none", "optimizer", "all"] = Field(
        "none", description="DeepSpeed CPU offload: optimizer states, or optimizer and parameters (zero3)."
    )
    num_processes: PositiveInt | None = Field(
        None, description="Processes in total over all machines; default: one per local GPU (1 on CPU) x machines."
    )
    num_machines: PositiveInt = Field(1, description="Machines taking part.")
    machine_rank: int = Field(0, ge=0, description="This machine's rank (0 on the main machine).")
    main_process_ip: str | None = Field(None, description="Address of machine 0 (required when num_machines > 1).")
    main_process_port: int | None = Field(None, ge=1, le=65535, description="Port on machine 0.")

    @model_validator(mode="after")
    def _consistent(self) -> DistributedSpec:
        if self.offload != "none" and self.strategy not in ("zero2", "zero3"):
            raise ValueError(f"offload: {self.offload!r} needs strategy zero2 or zero3 (got {self.strategy!r})")
        if self.offload == "all" and self.strategy != "zero3":
            raise ValueError("offload: 'all' (parameters too) needs strategy zero3")
        if self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank {self.machine_rank} must be below num_machines {self.num_machines}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ValueError("num_machines > 1 needs main_process_ip (the address of machine 0)")
        if self.strategy == "none" and (self.num_machines > 1 or (self.num_processes or 1) > 1):
            raise ValueError("several processes or machines need a strategy: ddp, zero2 or zero3")
        return self


class RewardSpec(_Strict):
    """Where a reward comes from: a trained reward model, an ensemble of them, or a rule function."""

    model: str | None = Field(
        None, description="Reward model directory or hub id (from `rlhf train-rm`); a directory with ensemble.json "
        "(`rlhf train-rm` with `ensemble:`) scores with every member."
    )
    models: list[str] | None = Field(
        None, description="Several reward models (directories or hub ids), an ensemble scored member by member and "
        "combined by `combine`."
    )
    function: str | None = Field(
        None, description="'module.path:function' taking (prompts, completions) lists and returning floats."
    )
    combine: Literal["mean", "min", "mean_minus_std"] | None = Field(
        None, description="Ensembles only: how the members' scores of a response become one: mean, min (worst "
        "case) or mean_minus_std (mean - std_coef * population std over members); default: mean (docs/ppo.md)."
    )
    std_coef: float | None = Field(
        None, ge=0.0, description="combine: mean_minus_std only: the weight of the members' disagreement; default 1.0."
    )

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if sum(value is not None for value in (self.model, self.models, self.function)) != 1:
            raise ValueError("give exactly one of 'model' (a reward model or an ensemble directory), 'models' "
                             "(several reward models) or 'function' (module.path:fn)")  # fmt: skip
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function must look like 'module.path:function', got {self.function!r}")
        if self.models is not None and len(self.models) < 2:
            raise ValueError("models lists an ensemble: give at least two reward models (one goes in 'model')")
        if self.function is not None and self.combine is not None:
            raise ValueError("combine is for several reward models (models, or an ensemble directory in model), "
                             "not a rule function")  # fmt: skip
        if self.std_coef is not None and self.combine != "mean_minus_std":
            raise ValueError("std_coef weighs the spread of combine: mean_minus_std; set that combine or remove it")
        return self

    @property
    def combine_how(self) -> str:
        return self.combine or "mean"

    @property
    def coef(self) -> float:
        return 1.0 if self.std_coef is None else self.std_coef

    def describe(self) -> str:
        """The reward in one phrase, for plans: the rule, the model, or the listed ensemble and how it combines."""
        if self.function:
            return self.function
        if self.models:
            how = self.combine_how + (f" {self.coef}" if self.combine_how == "mean_minus_std" else "")
            return f"{len(self.models)} reward models combined by {how}: {', '.join(self.models)}"
        return self.model


class EnsembleSpec(_Strict):
    """train-rm only: K reward models in one command, saved as RUN/member-k/ with RUN/ensemble.json."""

    members: int = Field(
        ge=2, description="How many reward models to train, one after another; member k uses seed + k."
    )
    bootstrap: bool = Field(
        False, description="Train each member on a seeded resample with replacement of the training rows (as many "
        "rows as data.train keeps); the held-out rows are the same for every member."
    )


class PPOSpec(_Strict):
    """The other three models of PPO (the policy is `model:`)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = Field(
        "ppo",
        description="ppo: this project's critic PPO (training keys: rlhf_cli PPOConfig); grpo / rloo: TRL's "
        "GRPOTrainer / RLOOTrainer on the same data and reward (training keys: their TRL configs).",
    )
    reward: RewardSpec = Field(description="The reward: a model or a rule function.")
    value_model: str | None = Field(
        None, description="Critic initialisation; default: the reward model (the policy when the reward is a rule)."
    )
    ref_model: str | None = Field(None, description="Frozen reference for the KL term; default: the policy's start.")
    judge: RewardSpec | None = Field(
        None,
        description="A second reward (model or rule) scored on every rollout and logged as judge_score, never "
        "trained on: the check that the proxy's gains are real.",
    )
    alarms: dict[str, Any] = Field(
        default_factory=dict,
        description="Reward-hacking alarms: mode (off|warn|stop), window, length_correlation, kl_multiple, "
        "entropy_collapse, repetition_jump, judge_divergence (see docs/ppo.md).",
    )

    @model_validator(mode="after")
    def _alarms_are_known(self) -> PPOSpec:
        from dataclasses import fields

        from rlhf_cli.evaluation.alarms import AlarmConfig

        known = {f.name for f in fields(AlarmConfig)}
        unknown = sorted(set(self.alarms) - known)
        if unknown:
            raise ValueError(f"unknown alarms key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            AlarmConfig(**self.alarms)  # its own checks: mode, window, thresholds
        except ValueError as exc:
            raise ValueError(f"ppo.alarms: {str(exc).rstrip('.')}") from None
        return self

    @model_validator(mode="after")
    def _critic_only_for_ppo(self) -> PPOSpec:
        if self.algorithm != "ppo" and (self.value_model or self.ref_model):
            raise ValueError(
                f"{self.algorithm} has no critic and takes its reference from the policy's start: remove "
                "value_model/ref_model, or use algorithm: ppo"
            )
        return self


class DPOSpec(_Strict):
    """Offline preference optimisation from pairs (the policy is `model:`, the pairs are `data:`)."""

    algorithm: Literal["dpo", "orpo", "simpo"] = Field(
        "dpo",
        description="dpo: TRL's DPOTrainer against a frozen reference (training keys: DPOConfig, every loss_type); "
        "orpo / simpo: reference-free, TRL's experimental ORPOTrainer / CPOTrainer with loss_type simpo (training "
        "keys: ORPOConfig / CPOConfig).",
    )
    ref_model: str | None = Field(
        None,
        description="dpo only: the frozen reference pi_ref of the implicit reward beta*log(pi/pi_ref); default: the "
        "policy's starting weights (one frozen copy; with LoRA the base with the adapter off, no copy).",
    )

    @model_validator(mode="after")
    def _reference_only_for_dpo(self) -> DPOSpec:
        if self.algorithm != "dpo" and self.ref_model:
            raise ValueError(f"{self.algorithm} is reference-free: remove dpo.ref_model, or use algorithm: dpo")
        return self


class KTOSpec(_Strict):
    """Unpaired (thumbs-up / thumbs-down) optimisation; the policy is `model:`, the rows are `data:`."""

    ref_model: str | None = Field(
        None, description="The frozen reference; default: the policy's starting weights (with LoRA: the base)."
    )


GENERATION_BACKENDS = ("auto", "hf", "compiled", "vllm")


class GenerationSpec(_Strict):
    """How responses are decoded, for every stage that samples (ppo, eval, generate, label); see docs/generation.md."""

    backend: Literal["auto", "hf", "compiled", "vllm"] = Field(
        "auto",
        description="hf: transformers' generate. compiled: a static KV cache and a torch.compile'd decoding step "
        "(CUDA graphs on a GPU). vllm: a vLLM engine on the training GPUs (pip install \"rlhf-cli[vllm]\"). "
        "auto: compiled on a GPU, hf on CPU.",
    )
    prompt_bucket: PositiveInt = Field(
        32, description="compiled: prompts are left-padded to a multiple of this many tokens, so the compiled step "
        "sees a few shapes instead of recompiling for every prompt length."
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="vllm: the fraction of each GPU the engine may take (weights + KV cache)."
    )
    sleep: bool = Field(
        True, description="vllm: free the engine's GPU memory while PPO trains, and wake it for the next rollout."
    )


class SamplingSpec(_Strict):
    """How responses are sampled; the keys `eval:` and `generate:` share."""

    num_prompts: PositiveInt | None = Field(
        None, description="Answer a seeded random subset of this many prompts; default: every prompt."
    )
    max_new_tokens: PositiveInt = Field(64, description="Longest response, in tokens.")
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature; 0 decodes greedily. eval's KL estimate assumes 1.0."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold (1.0 = off).")
    batch_size: PositiveInt = Field(16, description="Prompts (or sequences) per forward pass.")
    max_prompt_length: PositiveInt = Field(512, description="Keep only the last N tokens of a longer prompt.")


class GenerateSpec(SamplingSpec):
    """`rlhf generate`: sample completions of `model:` for a prompt file into generations.jsonl."""

    prompts: DataSource = Field(
        description="Prompts to answer: any data with a prompt (prompt, prompt_completion, preference, alpaca)."
    )
    num_samples: PositiveInt = Field(1, description="Completions per prompt.")
    reward: RewardSpec | None = Field(
        None, description="Optional: score every completion with a reward model or a rule function."
    )


class CurveSpec(_Strict):
    """eval.curve: the over-optimisation curve of a PPO run's policy snapshots (training.snapshot_steps)."""

    run: str | None = Field(
        None, description="A `rlhf ppo` run directory whose snapshots/step-N are evaluated; default: eval.ppo_run."
    )
    every: PositiveInt = Field(
        1, description="Evaluate every n-th snapshot in step order (the last one always); 1 = all."
    )
    gold: RewardSpec = Field(
        description="The gold reward, a model or a rule (module.path:function), scored on the same responses as "
        "the proxy eval.reward_model."
    )


class EvalSpec(SamplingSpec):
    """`rlhf eval`: measure a policy (`model:`) against a reference, and a reward model on preference pairs."""

    name: str = Field(
        "policy", min_length=1, description="Label of the policy `model:` in the report and in `policies` of "
        "eval.json (with eval.compare)."
    )
    compare: dict[str, str] = Field(
        default_factory=dict, description="More policies to evaluate beside `model:`, {name: directory or hub id}: "
        "each answers the same prompts with the same seeds, is scored by the same reward model and judge, and the "
        "report adds each policy's numbers and the win rate of every pair of policies."
    )
    reference: str | None = Field(
        None, description="Reference policy (directory or hub id), e.g. the SFT model; enables win rate and KL, "
        "and with preferences a DPO policy's implicit reward."
    )
    reward_model: str | None = Field(
        None, description="Reward model (directory or hub id) that scores responses and preference pairs."
    )
    judge: RewardSpec | None = Field(
        None, description="A second reward (model or rule) scoring the same responses: proxy vs judge."
    )
    prompts: DataSource | None = Field(
        None, description="Prompts to sample the policy (and reference) on; absent: no sampling."
    )
    preferences: DataSource | None = Field(
        None, description="Held-out preference pairs: the reward model's accuracy, calibration and length bias; "
        "with a reference, a DPO policy's implicit-reward accuracy and margin."
    )
    beta: float | None = Field(
        None, gt=0.0, description="beta of the implicit reward beta*log(pi/pi_ref) on preferences; default: "
        "training.beta of a DPO policy's recipe.yaml (TRL's 0.1 when unset), else 0.1. Accuracy does not depend on it."
    )
    demonstrations: DataSource | None = Field(
        None, description="Held-out SFT data for the perplexity of the policy (and reference)."
    )
    ppo_run: str | None = Field(
        None, description="A `rlhf ppo` run directory: its metrics.jsonl becomes training-curve plots."
    )
    curve: CurveSpec | None = Field(
        None, description="Over-optimisation curve: every (or every n-th) policy snapshot of a PPO run, and the "
        "reference as step 0, sample eval.prompts with the same seeds; proxy (eval.reward_model) and gold "
        "(curve.gold) score the same responses, plotted against sqrt(KL to eval.reference). See docs/eval.md."
    )
    num_samples_in_report: int = Field(8, ge=0, description="Prompts shown with both responses in report.md.")
    max_length: PositiveInt = Field(
        512, description="Longest preference pair or demonstration (prompt + response) in tokens; a longer one "
        "is cut as training cuts it: the prompt's end and the response's start."
    )
    calibration_buckets: PositiveInt = Field(4, description="Equal-count score-gap buckets of the calibration table.")

    @model_validator(mode="after")
    def _something_to_do(self) -> EvalSpec:
        if not (self.prompts or self.preferences or self.demonstrations or self.ppo_run):
            raise ValueError("nothing to evaluate: give prompts, preferences, demonstrations or ppo_run")
        if self.preferences and not (self.reward_model or self.reference):
            raise ValueError("preferences are scored by a reward model, or by a DPO policy's implicit reward against "
                             "a reference: set reward_model or reference")
        if self.judge and not self.prompts:
            raise ValueError("judge scores sampled responses: it needs prompts")
        if self.reference and not (self.prompts or self.demonstrations or self.preferences):
            raise ValueError("reference is compared on prompts, demonstrations or preferences: give one of them")
        if self.compare and not (self.prompts or self.demonstrations or (self.preferences and self.reference)):
            raise ValueError("compare evaluates every policy on prompts, demonstrations or (with a reference) "
                             "preferences: give one of them")
        if self.curve is not None:
            missing = [key for key in ("prompts", "reference", "reward_model") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"curve needs {', '.join(missing)}: every snapshot answers eval.prompts, its KL is "
                                 "measured against eval.reference and the proxy score is eval.reward_model's")
            if self.curve.run is None and self.ppo_run is None:
                raise ValueError("curve needs a PPO run: set curve.run (or eval.ppo_run) to a `rlhf ppo` run "
                                 "directory saved with training.snapshot_steps")
        if self.name == "reference":
            raise ValueError("'reference' names eval.reference in the report: choose another eval.name")
        for key, path in self.compare.items():
            if key == self.name:
                raise ValueError(f"compare.{key} has the name of the policy `model:` (eval.name = {self.name!r}); "
                                 "give each policy its own name")
            if key == "reference":
                raise ValueError("compare.reference: 'reference' names eval.reference in the report; choose "
                                 "another policy name")
            if not key.strip() or key != key.strip():
                raise ValueError(f"compare: policy name {key!r} must be non-empty, without surrounding spaces")
            if not path.strip():
                raise ValueError(f"compare.{key}: give the policy's directory or hub id")
        return self


class LabellerSpec(_Strict):
    """Who or what compares the candidates: `type` and the keys of that labeller."""

    type: Literal["human", "judge", "reward_model", "rule"] = Field(
        description="human: an interactive terminal session (or one answer per stdin line); judge: a local "
        "instruction-tuned model under a constitution; reward_model: one or several reward models; rule: a "
        "Python function."
    )
    # judge (and the critique model of mode: revise)
    model: str | None = Field(
        None, description="judge: the judge model (a directory or hub id with a chat template); revise: the model "
        "that critiques and revises (default: the policy)."
    )
    gguf_file: str | None = Field(None, description="judge: a .gguf file inside `model` to load.")
    constitution: str | None = Field(
        None, description="judge / revise: a markdown file of principles, one per bullet; default: the one shipped "
        "with rlhf-cli (rlhf_cli/labelling/constitution.md)."
    )
    inconsistent: Literal["drop", "tie"] = Field(
        "drop", description="judge: a pair whose verdict flips when the two responses swap places is dropped "
        "(counted) or recorded as a tie."
    )
    # reward_model
    models: list[str] | None = Field(None, description="reward_model: reward model directories (one or more).")
    combine: Literal["mean", "min"] = Field(
        "mean", description="reward_model: how several reward models' scores of a candidate combine (min: the most "
        "pessimistic member, harder to exploit)."
    )
    min_margin: float = Field(
        0.0, ge=0.0, description="reward_model / rule: a pair whose combined scores differ by less is a tie."
    )
    # rule
    function: str | None = Field(None, description="rule: 'module.path:function' taking (prompts, completions).")
    # human
    mode: Literal["pairs", "rank"] = Field(
        "pairs", description="human: compare two candidates at a time, or rank all K at once."
    )
    guidelines: str | None = Field(None, description="human: a markdown file shown with the `g` key.")
    overlap: float = Field(
        0.0, ge=0.0, le=1.0, description="human: the share of items every annotator labels (for agreement); the "
        "others go to whoever reaches them first."
    )

    @model_validator(mode="after")
    def _keys_of_its_type(self) -> LabellerSpec:
        own = {"human": {"mode", "guidelines", "overlap"}, "judge": {"model", "gguf_file", "constitution",
               "inconsistent"}, "reward_model": {"models", "combine", "min_margin"},
               "rule": {"function", "min_margin"}}  # fmt: skip
        stray = sorted(self.model_fields_set - own[self.type] - {"type"})
        if stray:
            raise ValueError(f"{', '.join(stray)} {'is' if len(stray) == 1 else 'are'} not a key of the "
                             f"{self.type} labeller (its keys: {', '.join(sorted(own[self.type]))})")
        if self.type == "reward_model" and not self.models:
            raise ValueError("the reward_model labeller needs models: a list of reward model directories")
        if self.type == "rule" and (not self.function or ":" not in self.function):
            raise ValueError("the rule labeller needs function: 'module.path:function'")
        return self


class LabelSpec(SamplingSpec):
    """`rlhf label`: sample K responses per prompt (or read candidates) and have them compared."""

    prompts: DataSource | None = Field(
        None, description="Prompts to sample candidates for, from `model:` (any data with a prompt)."
    )
    candidates: DataSource | None = Field(
        None, description="Instead of sampling: rows of a prompt and a list of responses (`responses`; map other "
        "names with columns)."
    )
    num_responses: int = Field(4, ge=2, description="K: candidates sampled per prompt (InstructGPT used 4 to 9).")
    labeller: LabellerSpec | None = Field(None, description="Who compares them (not needed by mode: revise).")
    pairs: Literal["all", "best_vs_worst"] = Field(
        "all", description="A ranking of K becomes all K(K-1)/2 pairs, or one pair: best against worst."
    )
    format: Literal["pairs", "kto"] = Field(
        "pairs", description="pairs: prompt/chosen/rejected rows (train-rm, dpo); kto: prompt/completion/label rows."
    )
    mode: Literal["label", "revise"] = Field(
        "label", description="label: compare candidates; revise: Constitutional AI's supervised phase (sample, "
        "critique against a principle, revise) writing prompt/completion SFT rows."
    )

    @model_validator(mode="after")
    def _one_source(self) -> LabelSpec:
        if (self.prompts is None) == (self.candidates is None):
            raise ValueError("give exactly one of prompts (candidates are sampled from model:) or candidates")
        if self.mode == "label" and self.labeller is None:
            raise ValueError("mode label needs a labeller: human, judge, reward_model or rule")
        if self.mode == "label" and self.labeller.type == "judge" and not self.labeller.model:
            raise ValueError("the judge labeller needs model: a local instruction-tuned model with a chat template")
        if self.mode == "revise" and self.prompts is None:
            raise ValueError("mode revise samples its own responses: give prompts, not candidates")
        if self.mode == "revise" and self.labeller is not None and self.labeller.type != "judge":
            raise ValueError("mode revise takes no labeller, or a judge labeller naming the critique model and "
                             "constitution")
        return self


TRAINING_STAGES = ("sft", "rm", "ppo", "dpo", "kto")
RECIPE_STAGES = (*TRAINING_STAGES, "eval", "generate", "label")
SAMPLING_STAGES = ("ppo", "eval", "generate", "label")  # the stages that decode responses: `generation:`
COMMANDS = {"sft": "rlhf sft", "rm": "rlhf train-rm", "ppo": "rlhf ppo", "dpo": "rlhf dpo", "kto": "rlhf kto",
            "eval": "rlhf eval", "generate": "rlhf generate", "label": "rlhf label"}  # fmt: skip


class DivergenceSpec(_Strict):
    """The divergence guard of sft and train-rm. A NaN or infinite loss or gradient norm always stops the run
    (exit 3); a loss spike stops it only when `loss_spike` is set."""

    loss_spike: float | None = Field(
        None, gt=1.0, description="Stop when a logged training loss exceeds this many times the median of the "
        "previous `spike_window` logged losses (e.g. 10); off by default."
    )
    spike_window: PositiveInt = Field(10, description="How many previous logged losses the spike rule compares with.")


class Recipe(_Strict):
    stage: Literal["sft", "rm", "ppo", "dpo", "kto", "eval", "generate", "label"] | None = Field(
        None, description="Which command the recipe is for (sft, rm, ppo, dpo, kto, eval, generate or label); "
        "checked when given."
    )
    model: ModelSpec | None = Field(
        None,
        description="The model to train (or to start from) and its tokenizer. Required, except by eval, where "
        "it is the policy to evaluate (absent in a reward-model-only evaluation).",
    )
    data: DataSpec | None = Field(
        None, description="Training and evaluation data; required by sft, rm and ppo (eval and generate name "
        "their data in their own section)."
    )
    training: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of the stage's TRL config (SFTConfig for sft, RewardConfig for train-rm, DPOConfig for "
        "dpo (ORPOConfig / CPOConfig for its orpo / simpo algorithms), KTOConfig for kto).",
    )
    ppo: PPOSpec | None = Field(None, description="PPO only: reward, critic and reference models.")
    dpo: DPOSpec | None = Field(None, description="dpo only: algorithm (dpo, orpo, simpo) and reference model.")
    kto: KTOSpec | None = Field(None, description="kto only: reference model.")
    eval: EvalSpec | None = Field(None, description="eval only: what to evaluate, on which data, how to sample.")
    generate: GenerateSpec | None = Field(None, description="generate only: prompts and sampling.")
    label: LabelSpec | None = Field(None, description="label only: prompts or candidates, sampling, the labeller.")
    generation: GenerationSpec | None = Field(
        None, description="ppo, eval, generate and label: how responses are decoded (backend hf | compiled | vllm)."
    )
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="How many processes and which DeepSpeed/DDP strategy."
    )
    output_dir: str | None = Field(
        None, description="Run directory (relative to the current directory). --output-dir overrides it."
    )
    seed: int = Field(42, description="Seed for model init, data order and sampling.")
    report_to: list[str] | str = Field("none", description="Trackers: none, tensorboard, wandb, trackio, ...")
    divergence: DivergenceSpec = Field(
        default_factory=DivergenceSpec, description="When a diverging sft/train-rm run stops (NaN/inf always)."
    )
    ensemble: EnsembleSpec | None = Field(
        None, description="train-rm only: train an ensemble of reward models (members, bootstrap); see docs/ppo.md."
    )

    @model_validator(mode="after")
    def _fits_builtin_positions(self) -> Recipe:
        if self.model is None or self.data is None:
            return self
        if self.model.is_builtin and self.data.max_length > self.model.builtin.n_positions:
            raise ValueError(
                f"data.max_length ({self.data.max_length}) exceeds model.builtin.n_positions "
                f"({self.model.builtin.n_positions}), the longest sequence the builtin model can read"
            )
        return self

    @model_validator(mode="after")
    def _merge_needs_full_weights(self) -> Recipe:
        if self.model and self.model.lora and self.model.lora.merge and self.distributed.strategy == "zero3":
            raise ValueError(
                "model.lora.merge cannot run under zero3 (weights are sharded); train with merge: false and merge "
                "the saved adapter afterwards"
            )
        return self


STAGE_CONFIG = {"sft": "SFTConfig", "rm": "RewardConfig", "ppo": "PPOConfig", "dpo": "DPOConfig", "kto": "KTOConfig"}
ALGORITHM_CONFIG = {"grpo": "GRPOConfig", "rloo": "RLOOConfig"}  # `ppo.algorithm` hands the stage to TRL
DPO_ALGORITHM_CONFIG = {"orpo": "ORPOConfig", "simpo": "CPOConfig"}  # `dpo.algorithm`: TRL's experimental trainers


def training_config_class(recipe: Recipe, stage: str) -> str:
    """Which config class the recipe's `training:` keys belong to."""
    if stage == "ppo" and recipe.ppo is not None and recipe.ppo.algorithm in ALGORITHM_CONFIG:
        return ALGORITHM_CONFIG[recipe.ppo.algorithm]
    if stage == "dpo" and recipe.dpo is not None and recipe.dpo.algorithm in DPO_ALGORITHM_CONFIG:
        return DPO_ALGORITHM_CONFIG[recipe.dpo.algorithm]
    return STAGE_CONFIG[stage]

# Training keys owned by other recipe sections or by the CLI.
_OWNED_KEYS = {
    "output_dir": "the top-level `output_dir` or --output-dir",
    "seed": "the top-level `seed`",
    "report_to": "the top-level `report_to`",
    "deepspeed": "`distributed.strategy` (the DeepSpeed JSON is generated)",
    "max_length": "`data.max_length`",
    "resume_from_checkpoint": "--resume",
    "overwrite_output_dir": "--overwrite",
}


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars and no duplicate keys:
    - `1e-5` is a float (YAML 1.1 wants `1.0e-5`, a trap in every recipe);
    - only true/false are booleans: `save_strategy: no` is the string TRL means, not False;
    - a key given twice is an error, not a silent replacement of the first (often a whole section).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hashable = hash(key) is not None
                except TypeError:
                    hashable = False
                if hashable and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {seen[key] + 1}); keep one",
                        key_node.start_mark,
                    )
                if hashable:
                    seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UserError(f"{source} is not valid YAML: {exc}") from None


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Recipe file {path} does not exist." if not path.exists() else f"{path} is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8.") from None
    except OSError as exc:
        raise UserError(f"Cannot read the recipe {path}: {exc.strerror or exc}.") from None
    raw = parse_yaml(text, str(path))
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a YAML mapping (model:, data:, training:, ...), not {type(raw).__name__}.")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` overrides; values are parsed as YAML (`--set training.learning_rate=1e-4`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key.path=value, got {item!r}.")
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise UserError(f"--set {item!r}: {where} is a value, not a section.")
            node = child
        parsed = parse_yaml(value, f"--set {key}")
        path_key = key.strip() in _PATH_KEYS or key.strip().startswith("eval.compare.")
        if path_key and isinstance(parsed, str) and (Path.cwd() / parsed).exists():
            parsed = str((Path.cwd() / parsed).resolve())  # typed at the shell: relative to where it was typed
        node[parts[-1]] = parsed
    return raw


_PATH_KEYS = {"model.name_or_path", "model.tokenizer", "model.chat_template", "data.train.path", "data.eval.path",
              "ppo.reward.model", "ppo.value_model", "ppo.ref_model",
              "eval.reference", "eval.reward_model", "eval.judge.model", "eval.prompts.path", "eval.preferences.path",
              "eval.demonstrations.path", "eval.ppo_run", "eval.curve.run", "eval.curve.gold.model",
              "generate.prompts.path", "generate.reward.model",
              "label.prompts.path", "label.candidates.path", "label.labeller.model", "label.labeller.constitution",
              "label.labeller.guidelines"}


# ---------------------------------------------------------------- errors


def _allowed_keys(loc: tuple) -> list[str]:
    """Field names allowed at `loc` (the parent of a rejected key), walking the pydantic models."""
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _problem_lines(exc: ValidationError) -> list[str]:
    """One sentence per schema problem, naming the key."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(
                f"{where}: unknown key.{did_you_mean(str(loc[-1]), allowed)}"
                + (f" Allowed here: {', '.join(allowed)}." if allowed else "")
            )
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing.")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {msg}{shown}.")
    return lines


# ---------------------------------------------------------------- paths


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value.endswith((".jsonl", ".json", ".parquet", ".csv"))


def _resolve_path(value: str | None, base_dir: Path, *, must_exist: bool, what: str) -> str | None:
    """Resolve a local path relative to the recipe's folder; anything else that does not exist is a hub id."""
    if value is None:
        return None
    candidate = (base_dir / Path(value).expanduser()).resolve()
    if candidate.exists():
        return str(candidate)
    if must_exist or _looks_like_path(value):
        made_by = _made_by([candidate], base_dir)
        raise UserError(f"{what}: {value!r} does not exist{' yet' if made_by else ''} (looked for {candidate})"
                        f"{made_by}.")  # fmt: skip
    # Not path-like: a hub id, unless a recipe next to this one writes exactly that directory when run from here
    # (transformers reads such a name relative to the current directory first, so it loads once that has run).
    from_cwd = (Path.cwd() / Path(value).expanduser()).resolve()
    made_by = "" if from_cwd.exists() else _made_by([from_cwd], base_dir, here_only=True)
    if made_by:
        looked = candidate if candidate == from_cwd else f"{candidate} and {from_cwd}"
        raise UserError(f"{what}: {value!r} does not exist yet (looked for {looked}){made_by}.")
    return str(value)  # a hub id


def _made_by(targets: list[Path], base_dir: Path, *, here_only: bool = False) -> str:
    """'; it is made by `rlhf sft recipes/tiny/sft.yaml` (output_dir of that recipe)' when a recipe in `base_dir`
    (a stage recipe by its `output_dir`, a pipeline recipe by `output_dir`/STAGE) writes one of the missing
    `targets`; "" when none does. `here_only`: only a recipe run from the current directory counts. Called only
    for a missing path: the sibling *.yaml files are parsed only then."""
    import os

    cwd = Path.cwd().resolve()
    try:
        siblings = sorted(p.resolve() for p in base_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    except OSError:
        return ""
    found: list[tuple[bool, str]] = []
    for sibling in siblings:
        try:
            raw = parse_yaml(sibling.read_text(encoding="utf-8"), str(sibling))
        except (OSError, UnicodeError, UserError):
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("output_dir"), str) or not raw["output_dir"]:
            continue
        out = Path(raw["output_dir"]).expanduser()
        if isinstance(raw.get("stages"), dict):
            products = [(out / name, "rlhf pipeline", f"stage {name} of that pipeline")
                        for name in raw["stages"] if isinstance(name, str)]  # fmt: skip
        elif raw.get("stage") in COMMANDS:
            products = [(out, COMMANDS[raw["stage"]], "output_dir of that recipe")]
        else:
            continue
        for written, command, role in products:
            relative = Path(os.path.normpath(written))
            for target in targets:
                if written.is_absolute() or ".." in relative.parts or not relative.parts:
                    run_from = cwd if (cwd / written).resolve() == target else None
                elif target.parts[-len(relative.parts):] == relative.parts:
                    run_from = Path(*target.parts[: -len(relative.parts)])  # where a relative output_dir lands here
                else:
                    run_from = None
                if run_from is not None and not (here_only and run_from != cwd):
                    shown = os.path.relpath(sibling, run_from) if sibling.is_relative_to(run_from) else str(sibling)
                    prefix = "" if run_from == cwd else f"cd {run_from} && "
                    found.append((run_from != cwd, f"; it is made by `{prefix}{command} {shown}` ({role})"))
    return min(found, key=lambda item: item[0])[1] if found else ""  # one run from here first, else the first


def _resolve_paths(recipe: Recipe, base_dir: Path) -> None:
    model = recipe.model
    if model is not None:
        if not model.is_builtin:
            model.name_or_path = _resolve_path(model.name_or_path, base_dir, must_exist=False,
                                               what="model.name_or_path")  # fmt: skip
        model.tokenizer = _resolve_path(model.tokenizer, base_dir, must_exist=False, what="model.tokenizer")
        if model.chat_template and "{" not in model.chat_template:
            path = _resolve_path(model.chat_template, base_dir, must_exist=True, what="model.chat_template")
            model.chat_template = Path(path).read_text(encoding="utf-8")
    if recipe.ppo is not None:
        ppo = recipe.ppo
        ppo.reward.model = _resolve_path(ppo.reward.model, base_dir, must_exist=False, what="ppo.reward.model")
        ppo.reward.models = _resolve_paths_list(ppo.reward.models, base_dir, "ppo.reward.models")
        ppo.value_model = _resolve_path(ppo.value_model, base_dir, must_exist=False, what="ppo.value_model")
        ppo.ref_model = _resolve_path(ppo.ref_model, base_dir, must_exist=False, what="ppo.ref_model")
    sources = {}
    if recipe.data is not None:
        sources.update({"data.train": recipe.data.train, "data.eval": recipe.data.eval})
    if recipe.eval is not None:
        spec = recipe.eval
        spec.reference = _resolve_path(spec.reference, base_dir, must_exist=False, what="eval.reference")
        spec.reward_model = _resolve_path(spec.reward_model, base_dir, must_exist=False, what="eval.reward_model")
        if spec.judge is not None:
            spec.judge.model = _resolve_path(spec.judge.model, base_dir, must_exist=False, what="eval.judge.model")
        spec.ppo_run = _resolve_path(spec.ppo_run, base_dir, must_exist=True, what="eval.ppo_run")
        if spec.curve is not None:
            spec.curve.run = _resolve_path(spec.curve.run, base_dir, must_exist=True, what="eval.curve.run")
            gold = spec.curve.gold
            gold.model = _resolve_path(gold.model, base_dir, must_exist=False, what="eval.curve.gold.model")
            if getattr(gold, "models", None):
                gold.models = [_resolve_path(path, base_dir, must_exist=False, what=f"eval.curve.gold.models[{n}]")
                               for n, path in enumerate(gold.models)]  # fmt: skip
        spec.compare = {name: _resolve_path(path, base_dir, must_exist=False, what=f"eval.compare.{name}")
                        for name, path in spec.compare.items()}  # fmt: skip
        sources.update({f"eval.{name}": getattr(spec, name) for name in ("prompts", "preferences", "demonstrations")})
    if recipe.generate is not None:
        spec = recipe.generate
        if spec.reward is not None:
            spec.reward.model = _resolve_path(spec.reward.model, base_dir, must_exist=False,
                                              what="generate.reward.model")  # fmt: skip
            spec.reward.models = _resolve_paths_list(spec.reward.models, base_dir, "generate.reward.models")
        sources["generate.prompts"] = spec.prompts
    if recipe.label is not None:
        spec = recipe.label
        sources.update({"label.prompts": spec.prompts, "label.candidates": spec.candidates})
        labeller = spec.labeller
        if labeller is not None:
            labeller.model = _resolve_path(labeller.model, base_dir, must_exist=False, what="label.labeller.model")
            if labeller.models:
                labeller.models = [_resolve_path(path, base_dir, must_exist=False, what=f"label.labeller.models[{n}]")
                                   for n, path in enumerate(labeller.models)]  # fmt: skip
            for key in ("constitution", "guidelines"):
                setattr(labeller, key, _resolve_path(getattr(labeller, key), base_dir, must_exist=True,
                                                     what=f"label.labeller.{key}"))  # fmt: skip
    for what, source in sources.items():
        if source is not None and source.path is not None:
            source.path = _resolve_path(source.path, base_dir, must_exist=True, what=f"{what}.path")


# ---------------------------------------------------------------- entry points


# The sections each stage cannot run without (besides what the schema itself requires).
_REQUIRED_SECTIONS = {"sft": ("model", "data"), "rm": ("model", "data"), "ppo": ("model", "data"),
                      "dpo": ("model", "data"), "kto": ("model", "data"), "eval": ("eval",),
                      "generate": ("model", "generate"), "label": ("label",)}  # fmt: skip


def _non_finite_numbers(value: Any, where: str = "") -> list[str]:
    """Dotted keys holding NaN or infinity (`.inf`, `.nan`): never a meaningful setting."""
    if isinstance(value, float) and not math.isfinite(value):
        return [where or "(top level)"]
    if isinstance(value, dict):
        return [key for name, item in value.items() for key in _non_finite_numbers(item, f"{where}.{name}".strip("."))]
    if isinstance(value, list):
        return [key for n, item in enumerate(value) for key in _non_finite_numbers(item, f"{where}[{n}]")]
    return []


_SECRET_NAMES = re.compile(r"(^|_)(token|api_key|apikey|secret|password|passwd|credentials?)$")
_NOT_SECRETS = {"eos_token", "pad_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}


def is_secret_key(name: str) -> bool:
    """A key whose value is a credential (hub_token, wandb_api_key, ...), not a token of the vocabulary."""
    return name not in _NOT_SECRETS and bool(_SECRET_NAMES.search(name.lower()))


SECRET_ENV = {"hub_token": "HF_TOKEN"}  # where a credential given in a recipe is handed to the libraries instead


def take_secrets(recipe: Recipe) -> None:
    """Move credentials out of `training:` into the environment of this process (and so of its workers), so the
    saved recipe, training_args.bin and logs never hold them. The library reads HF_TOKEN itself."""
    import os

    for key in [key for key in recipe.training if is_secret_key(key)]:
        value = recipe.training.pop(key)
        env = SECRET_ENV.get(key)
        if env and isinstance(value, str) and value and not os.environ.get(env):
            os.environ[env] = value


def validate_recipe(raw: dict, stage: str, *, source: str = "recipe", base_dir: Path | None = None) -> Recipe:
    """Validate a raw recipe mapping for `stage` (one of RECIPE_STAGES) and resolve its paths."""
    non_finite = _non_finite_numbers(raw)
    if non_finite:
        raise UserError(f"Recipe {source}: {', '.join(non_finite)} must be a finite number, not NaN or infinity.")
    unknown_secrets = [key for key in (raw.get("training") or {}) if is_secret_key(str(key)) and key not in SECRET_ENV]
    if unknown_secrets:
        raise UserError(f"Recipe {source}: training.{unknown_secrets[0]} is a credential; recipes are saved into "
                        "every run directory, so set it in the environment instead (e.g. WANDB_API_KEY, HF_TOKEN).")  # fmt: skip
    problems = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = _problem_lines(exc)
    if raw.get("stage") in (None, stage):  # a recipe for another command gets the message below instead
        missing = [f"{key}: required key is missing." for key in _REQUIRED_SECTIONS[stage] if raw.get(key) is None]
        problems = missing + problems
    if problems:
        plural = "s" if len(problems) > 1 else ""
        raise UserError(f"Recipe {source} has {len(problems)} problem{plural}: " + " ".join(problems))
    if recipe.stage is not None and recipe.stage != stage:
        raise UserError(f"Recipe {source} says `stage: {recipe.stage}`; run it with `{COMMANDS[recipe.stage]}`.")
    if stage not in TRAINING_STAGES:
        _check_sections_without_training(recipe, stage, source)
        _resolve_paths(recipe, base_dir or Path.cwd())
        from rlhf_cli.preflight import check_recipe

        check_recipe(recipe, stage, source)
        return recipe
    for section in ("eval", "generate", "label"):
        if getattr(recipe, section) is not None:
            raise UserError(f"Recipe {source} has an `{section}:` section, but it is run as the {stage} stage; "
                            f"`{section}:` belongs in a recipe for `{COMMANDS[section]}`.")  # fmt: skip
    if (stage == "ppo") != (recipe.ppo is not None):
        needed = "needs a `ppo:` section (reward, value_model, ref_model)" if stage == "ppo" else "has a `ppo:` section"
        raise UserError(f"Recipe {source} {needed}, but it is run as the {stage} stage.")
    for section in ("dpo", "kto"):  # optional in their own stage (defaults), refused elsewhere
        if getattr(recipe, section) is not None and stage != section:
            raise UserError(f"Recipe {source} has a `{section}:` section, but it is run as the {stage} stage; "
                            f"`{section}:` belongs in a recipe for `{COMMANDS[section]}`.")  # fmt: skip
    if recipe.ensemble is not None and stage != "rm":
        raise UserError(f"Recipe {source} has an `ensemble:` section, but it is run as the {stage} stage; "
                        "ensembles are trained by `rlhf train-rm` (score with one through a reward's model or "
                        "models key).")  # fmt: skip
    if recipe.generation is not None and stage not in SAMPLING_STAGES:
        raise UserError(f"Recipe {source} has a `generation:` section, but the {stage} stage samples nothing; "
                        f"`generation:` belongs in a recipe for {', '.join(COMMANDS[s] for s in SAMPLING_STAGES)}.")  # fmt: skip
    if stage == "dpo" and recipe.dpo is None:
        recipe.dpo = DPOSpec()
    if stage == "kto" and recipe.kto is None:
        recipe.kto = KTOSpec()
    for key, owner in _OWNED_KEYS.items():
        if key in recipe.training:
            raise UserError(f"Recipe {source}: training.{key} is not set here; use {owner}.")
    config_class = training_config_class(recipe, stage)
    problems = check_training_keys(config_class, recipe.training)
    if problems:
        raise UserError(f"Recipe {source} has a bad `training` section for {config_class}: " + " ".join(problems))
    take_secrets(recipe)
    _resolve_paths(recipe, base_dir or Path.cwd())
    from rlhf_cli.preflight import check_recipe

    check_recipe(recipe, stage, source)
    return recipe


def _resolve_paths_list(paths: list[str] | None, base_dir: Path, what: str) -> list[str] | None:
    """`_resolve_path` for each path of a list key (a reward ensemble's models)."""
    if paths is None:
        return None
    return [_resolve_path(path, base_dir, must_exist=False, what=f"{what}[{index}]") for index, path in enumerate(paths)]


def _check_sections_without_training(recipe: Recipe, stage: str, source: str) -> None:
    """eval and generate train nothing: no `training:`, `data:`, `ppo:`, LoRA or multi-process launch."""
    own = {"eval": "eval.prompts, eval.preferences or eval.demonstrations", "generate": "generate.prompts",
           "label": "label.prompts or label.candidates"}[stage]  # fmt: skip
    refusals = [
        (recipe.training, f"trains nothing, so it takes no `training:` section; sampling settings go in `{stage}:`"),
        (recipe.data, f"reads no `data:` section; its data goes in {own}"),
        (recipe.ppo, "takes no `ppo:` section"),
        (recipe.dpo, "takes no `dpo:` section"),
        (recipe.kto, "takes no `kto:` section"),
        (recipe.ensemble, "takes no `ensemble:` section (ensembles are trained by `rlhf train-rm`)"),
        *[(getattr(recipe, other), f"takes no `{other}:` section (that is the {other} stage's)")
          for other in ("eval", "generate", "label") if other != stage],
        (recipe.model is not None and recipe.model.lora,
         "trains nothing: remove model.lora (a saved LoRA adapter directory loads as it is)"),
        (recipe.distributed.strategy != "none", "runs in one process: distributed.strategy must be none"),
    ]  # fmt: skip
    for present, reason in refusals:
        if present:
            raise UserError(f"Recipe {source}: the {stage} stage {reason}.")
    if stage == "label" and recipe.model is None and recipe.label.prompts is not None:
        raise UserError(f"Recipe {source}: label.prompts are answered by the policy `model:`, and the recipe names "
                        "none; set model.name_or_path, or give label.candidates instead.")  # fmt: skip
    if stage == "eval" and recipe.model is None:
        needs = [key for key in ("prompts", "demonstrations", "compare") if getattr(recipe.eval, key)]
        if needs:
            raise UserError(f"Recipe {source}: eval.{needs[0]} is for evaluating a policy, and the recipe names "
                            "none; set model.name_or_path to the policy.")  # fmt: skip
        if recipe.eval.preferences is not None and recipe.eval.reward_model is None:
            raise UserError(f"Recipe {source}: eval.preferences without eval.reward_model are scored by a policy's "
                            "implicit reward against eval.reference, and the recipe names no policy; set "
                            "model.name_or_path to the (DPO) policy, or eval.reward_model.")  # fmt: skip


def load_recipe(path: str | Path, stage: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    raw = apply_overrides(read_recipe_file(path), overrides or [])
    return validate_recipe(raw, stage, source=str(path), base_dir=Path(path).resolve().parent)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The fully resolved recipe (defaults included) as YAML, for `recipe show` and the run directory."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)



def describe_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every recipe key, for `rlhf recipe show --defaults`."""
    rows = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = next(
            (c for c in (info.annotation, *getattr(info.annotation, "__args__", ()))
             if isinstance(c, type) and issubclass(c, BaseModel)),
            None,
        )  # fmt: skip
        if info.is_required():
            default = "(required)"
        elif nested is not None:
            default = "" if info.default is None and info.default_factory is None else "(section)"
        else:
            value = info.get_default(call_default_factory=True)
            default = json.dumps(value) if not isinstance(value, str) else value
        meaning = info.description or ((nested.__doc__ or "").strip().splitlines() or [""])[0] if nested else ""
        rows.append((key, default, info.description or meaning))
        if nested is not None:
            rows.extend(describe_keys(nested, f"{key}."))
    if model is Recipe and not prefix:  # what a stage sets where the recipe does not, after the key it concerns
        from rlhf_cli.stages.common import stage_default_rows

        for row in stage_default_rows():
            base = row[0].split(" (")[0]  # "training.save_steps (sft, rm)" -> "training.save_steps"
            anchor = base if any(key == base for key, _, _ in rows) else base.rsplit(".", 1)[0]
            at = max(i for i, (key, _, _) in enumerate(rows) if key == anchor or key.startswith(f"{anchor}.")
                     or key.split(" (")[0] == anchor)  # fmt: skip
            rows.insert(at + 1, row)
        # PPO's `training:` keys are this project's PPOConfig (not a TRL config): each with its default and meaning
        from dataclasses import MISSING, fields

        from rlhf_cli.ppo.config import PPOConfig

        at = max(i for i, (key, _, _) in enumerate(rows) if key.split(" (")[0].startswith("training"))
        ppo_rows = [(f"training.{f.name} (ppo)", "null" if f.default is None else str(f.default).lower()
                     if isinstance(f.default, bool) else str(f.default), f.metadata.get("help", ""))
                    for f in fields(PPOConfig) if f.default is not MISSING]  # fmt: skip
        rows[at + 1:at + 1] = ppo_rows
    return rows
