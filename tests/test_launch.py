"""Accelerate/DeepSpeed configs and launch commands from the `distributed:` section (no process is started)."""

from pathlib import Path

from rlhf_cli.launch import Hardware, plan_launch, precision_settings
from rlhf_cli.recipe import validate_recipe

CPU = Hardware(gpus=0)
EIGHT_GPUS = Hardware(gpus=8, bf16_supported=True)


def recipe(distributed=None, training=None):
    raw = {"model": {"name_or_path": "builtin:tiny-gpt2"}, "data": {"train": {"name": "org/d"}},
           "training": training or {}, "distributed": distributed or {}}
    return validate_recipe(raw, "sft")


def test_none_runs_in_process_with_the_users_command():
    plan = plan_launch(recipe(), "sft", "SFTConfig", Path("/runs/x"), CPU, cli_argv=["rlhf", "sft", "r.yaml"])
    assert not plan.distributed
    assert plan.command == ["rlhf", "sft", "r.yaml"]
    assert plan.precision == {"use_cpu": True, "bf16": False, "fp16": False}


def test_zero3_resolves_every_batch_field():
    r = recipe({"strategy": "zero3", "num_processes": 8},
               {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_grad_norm": 0.5})
    plan = plan_launch(r, "sft", "SFTConfig", Path("/runs/x"), EIGHT_GPUS)
    ds = plan.deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"] == {"enabled": True}
    assert "auto" not in str(ds)
    assert plan.accelerate_config["distributed_type"] == "DEEPSPEED"
    assert plan.accelerate_config["deepspeed_config"]["zero3_init_flag"] is True
    assert plan.accelerate_config["num_processes"] == 8


def test_defaults_come_from_the_trl_config_and_gpu_count():
    plan = plan_launch(recipe({"strategy": "zero2"}), "sft", "SFTConfig", Path("/r"), EIGHT_GPUS)
    ds = plan.deepspeed_config
    assert plan.num_processes == 8
    assert ds["train_micro_batch_size_per_gpu"] == 8  # SFTConfig's default
    assert ds["train_batch_size"] == 64
    assert ds["zero_optimization"]["stage"] == 2
    assert "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]


def test_offload_sections():
    ds = plan_launch(recipe({"strategy": "zero3", "offload": "all"}), "sft", "SFTConfig", Path("/r"),
                     EIGHT_GPUS).deepspeed_config
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    ds = plan_launch(recipe({"strategy": "zero2", "offload": "optimizer"}), "sft", "SFTConfig", Path("/r"),
                     CPU).deepspeed_config
    assert "offload_param" not in ds["zero_optimization"]
    assert ds["zero_optimization"]["offload_optimizer"]["pin_memory"] is False  # no pinned memory without a GPU


def test_ddp_on_cpu_and_multi_node():
    r = recipe({"strategy": "ddp", "num_processes": 16, "num_machines": 2, "machine_rank": 1,
                "main_process_ip": "10.0.0.1", "main_process_port": 29500})
    plan = plan_launch(r, "sft", "SFTConfig", Path("/runs/x"), CPU)
    config = plan.accelerate_config
    assert plan.deepspeed_config is None
    assert config["distributed_type"] == "MULTI_CPU" and config["use_cpu"] is True
    assert (config["num_machines"], config["machine_rank"]) == (2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29500)


def test_command_reexecutes_the_stage_under_accelerate(tmp_path):
    plan = plan_launch(recipe({"strategy": "zero3", "num_processes": 2}), "rm", "RewardConfig", tmp_path, CPU,
                       resume=True)
    cmd = plan.command
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(tmp_path / "accelerate_config.yaml")
    assert cmd[cmd.index("-m", 3) + 1 :][:3] == ["rlhf_cli.worker", "rm", str(tmp_path / "recipe.yaml")]
    assert cmd[-1] == "--resume"
    plan.write(tmp_path)
    assert (tmp_path / "deepspeed.json").is_file() and (tmp_path / "accelerate_config.yaml").is_file()


def test_precision_on_gpus():
    assert precision_settings({}, EIGHT_GPUS) == {"bf16": True}
    assert precision_settings({"fp16": True}, EIGHT_GPUS) == {"bf16": False, "fp16": True}
    assert precision_settings({}, Hardware(gpus=1, bf16_supported=False)) == {"bf16": False}


def test_trainer_config_takes_what_other_sections_decide(tmp_path):
    from rlhf_cli.stages import STAGES
    from rlhf_cli.stages.common import trainer_config_kwargs

    raw = {"model": {"name_or_path": "builtin:tiny-gpt2"},
           "data": {"train": {"name": "org/d"}, "eval": {"name": "org/d", "split": "test"}, "max_length": 77},
           "training": {"learning_rate": 1e-3}, "distributed": {"strategy": "zero3", "num_processes": 2},
           "seed": 5, "report_to": "all"}
    r = validate_recipe(raw, "rm")
    plan = plan_launch(r, "rm", "RewardConfig", tmp_path, CPU)
    kwargs = trainer_config_kwargs(STAGES["rm"], r, tmp_path, plan)
    assert kwargs["learning_rate"] == 1e-3 and kwargs["max_length"] == 77 and kwargs["seed"] == 5
    assert kwargs["output_dir"] == str(tmp_path) and kwargs["report_to"] == "all"
    assert kwargs["deepspeed"] == str(tmp_path / "deepspeed.json")
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is False
    assert kwargs["eval_strategy"] == "steps"  # eval data given: evaluate it (with every checkpoint and at the end)
    assert kwargs["save_total_limit"] == 2 and kwargs["num_train_epochs"] == 1  # train-rm's defaults
    raw["training"]["eval_strategy"] = "no"
    kwargs = trainer_config_kwargs(STAGES["rm"], validate_recipe(raw, "rm"), tmp_path, plan)
    assert kwargs["eval_strategy"] == "no"


def test_tokenizer_mismatch_names_the_first_difference():
    from rlhf_cli.models import TOKENIZER_FACTS, tokenizer_mismatch

    class tok:  # the four facts a tokenizer is compared on
        def __init__(self, vocab=None, eos="</s>", pad=None, template="T"):
            self.vocab = vocab or {"a": 0, "b": 1}
            self.eos_token, self.pad_token, self.chat_template = eos, pad, template

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    base = tok(pad="<pad>")
    assert tokenizer_mismatch(base, tok(pad="<pad>"), TOKENIZER_FACTS) is None
    assert tokenizer_mismatch(base, tok(), TOKENIZER_FACTS) is None  # no pad: the stage supplies EOS as pad
    assert tokenizer_mismatch(base, tok(eos="<eos>")) == "its EOS token is '<eos>', not '</s>'"
    assert tokenizer_mismatch(base, tok(pad="<unk>"), TOKENIZER_FACTS) == "its pad token is '<unk>', not '<pad>'"
    assert tokenizer_mismatch(base, tok(template="U"), TOKENIZER_FACTS) == "its chat template differs"
    assert tokenizer_mismatch(base, tok(template="U")) is None  # only vocabulary and EOS by default
    assert tokenizer_mismatch(base, tok(vocab={"a": 0, "c": 1})).startswith("its vocabulary differs")
