"""The bare-TRL side of dpo_overhead.py: the DPO run a user would write with TRL alone.

Usage (normally started by dpo_overhead.py, in the project's environment):
    python benchmarks/_trl_dpo.py SPEC.json RESULT.json

What a plain TRL script does, nothing more: read the preference file with `datasets`, load the tokenizer and the
model, build `DPOConfig` from the benchmark's settings, let `DPOTrainer` tokenize the pairs itself and create its
reference model (from the policy's path), train, save the model. Afterwards (outside every timing but the
whole-process one, and only a few milliseconds) the result file gets the trainer's own train metrics, its logged
losses and the number of tokens in the pairs as TRL tokenized them.
"""

from __future__ import annotations

import sys

from _bench_common import read_spec, versions, write_result


def main(spec_file: str, result_file: str) -> int:
    spec = read_spec(spec_file)

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    dataset = load_dataset("json", data_files=spec["data_file"], split="train")
    config = DPOConfig(output_dir=spec["trl_output_dir"], **spec["trl_config"])
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model()

    rows = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(rows["prompt_ids"], rows["chosen_ids"],
                                                                 rows["rejected_ids"]))  # fmt: skip
    write_result(result_file, {
        "impl": "trl",
        "train_metrics": result.metrics,
        "losses": {str(entry["step"]): entry["loss"] for entry in trainer.state.log_history if "loss" in entry},
        "global_step": trainer.state.global_step,
        "train_rows": len(rows),
        "train_tokens": tokens,  # prompt twice (with each response) + both responses, summed over the rows
        "device": str(trainer.args.device),
        "precision": {"no": "float32"}.get(str(trainer.accelerator.mixed_precision),
                                           str(trainer.accelerator.mixed_precision)),  # "bf16": autocast
        "dtype": str(trainer.model.dtype),
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
