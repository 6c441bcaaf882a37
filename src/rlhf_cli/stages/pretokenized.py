"""TRL's preference trainers, taking the rows `rlhf_cli.lengths` has already tokenized and cut.

TRL's DPOTrainer and KTOTrainer tokenize their data again and then DROP every row whose prompt alone fills
`max_length`, without a word; the experimental ORPO / CPO trainers cut prompts and responses by their own rule. The
stages hand them rows already fitted to `data.max_length` by `data.on_too_long` (counted, said), in the columns the
trainers build for themselves, and these subclasses skip TRL's own tokenization for such rows:

    DPO   `prompt_ids`, `chosen_ids`, `rejected_ids`       (what DPOTrainer._prepare_dataset makes)
    KTO   `prompt_ids`, `completion_ids`, `label`          (what KTOTrainer._prepare_dataset makes; the KL
                                                            completions are added here as TRL adds them)
    ORPO / CPO  the same three ids columns, turned into the `tokenize_row` output those trainers collate
                (prompt_input_ids, chosen_input_ids / _attention_mask / _labels, rejected_...)

ORPO and CPO live in `trl.experimental`, whose API may change in any release: tests/test_dpo.py pins the parts
relied on here (`tokenize_row(feature, model)` mapped over the rows, the keys it returns, the collator's padding),
so that a TRL upgrade that changes them fails a test rather than a run.

Importing this module imports trl (seconds): only a training process does.
"""

from __future__ import annotations

from typing import Any

from trl import DPOTrainer, KTOTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer


def _fitted(dataset: Any, *columns: str) -> bool:
    names = getattr(dataset, "column_names", None) or []
    return all(column in names for column in columns)


class FittedDPOTrainer(DPOTrainer):
    """DPOTrainer on rows with `prompt_ids` / `chosen_ids` / `rejected_ids` (TRL's own columns) taken as they are."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if _fitted(dataset, "prompt_ids", "chosen_ids", "rejected_ids"):
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)


def rotated_completions(completion_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """KTO's mismatched completions for its KL estimate: within each run of `batch_size` rows (the trainer's
    sequential batches), row i takes the completion of row i-1 and the first row the batch's last:
        (x_1, y_1), ..., (x_n, y_n)  ->  (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1})
    """
    out: list[list[int]] = []
    for start in range(0, len(completion_ids), batch_size):
        batch = completion_ids[start : start + batch_size]
        out.extend(batch[-1:] + batch[:-1])
    return out


class FittedKTOTrainer(KTOTrainer):
    """KTOTrainer on rows with `prompt_ids` / `completion_ids` / `label` taken as they are; the KL completions are
    added as TRL adds them (`rotated_completions`, in batches of per_device_train_batch_size)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not _fitted(dataset, "prompt_ids", "completion_ids", "label"):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self.calculate_KL and "KL_completion_ids" not in dataset.column_names:
            rotated = rotated_completions(dataset["completion_ids"], args.per_device_train_batch_size)
            dataset = dataset.add_column("KL_completion_ids", rotated)
        return dataset


def tokenized_pair(feature: dict) -> dict:
    """One fitted pair as ORPO's / CPO's `tokenize_row` returns it: prompt ids, and for each response the prompt +
    response ids with labels that mask the prompt (-100)."""
    prompt, out = list(feature["prompt_ids"]), {}
    out["prompt_input_ids"], out["prompt_attention_mask"] = prompt, [1] * len(prompt)
    for name in ("chosen", "rejected"):
        response = list(feature[f"{name}_ids"])
        out[f"{name}_input_ids"] = prompt + response
        out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(response))
        out[f"{name}_labels"] = [-100] * len(prompt) + response
    return out


class FittedORPOTrainer(ORPOTrainer):
    def tokenize_row(self, feature, model=None):
        if "prompt_ids" in feature and "chosen_ids" in feature:
            return tokenized_pair(feature)
        return super().tokenize_row(feature, model)


class FittedCPOTrainer(CPOTrainer):
    def tokenize_row(self, feature, model=None):
        if "prompt_ids" in feature and "chosen_ids" in feature:
            return tokenized_pair(feature)
        return super().tokenize_row(feature, model)
