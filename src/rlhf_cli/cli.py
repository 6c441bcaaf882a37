"""The `rlhf` command: thin Typer commands that load a recipe and hand it to a stage.

No torch, transformers or trl at import time, so `rlhf --help` and `rlhf recipe validate` answer at once.
"""

from __future__ import annotations

import sys
from functools import wraps
from typing import Annotated, Optional

from rlhf_cli import interrupts

if __name__ == "__main__" or sys.argv[0].endswith("rlhf"):
    interrupts.install(early=True)  # the command is starting: a signal during the imports below exits at once

import typer  # noqa: E402

from rlhf_cli.errors import UserError  # noqa: E402

app = typer.Typer(
    name="rlhf",
    help="RLHF on the Hugging Face stack: supervised fine-tuning, reward models, PPO, DPO/KTO and evaluation, each "
    "from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
recipe_app = typer.Typer(help="Check and inspect recipes without training.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
data_app = typer.Typer(help="Look at a recipe's data as its trainer will see it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

VERSIONED = ("torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed")


def version_lines() -> list[str]:
    """rlhf-cli's version, Python's and the installed libraries', read from package metadata (nothing imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = [f"rlhf-cli {installed('rlhf-cli')}", f"python {platform.python_version()}"]
    return lines + [f"{name} {installed(name)}" for name in VERSIONED]


def _print_version(value: bool) -> None:
    if value:
        print("\n".join(version_lines()))
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_print_version, is_eager=True,
                     help="Print the versions of rlhf-cli, Python, torch and the Hugging Face libraries, then exit."),
    ] = None,
) -> None:
    pass


RecipeArg = Annotated[str, typer.Argument(help="Path to the YAML recipe.", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set training.learning_rate=1e-4 (repeatable)."),
]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output-dir", "-o", help="Run directory; overrides the recipe's output_dir.")
]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace a previous run of rlhf in the output directory; it is deleted only once the new run "
    "succeeds. A folder rlhf did not create (no .rlhf-run marker) is never replaced.")]  # fmt: skip
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Continue from the newest complete checkpoint in the output directory.")]  # fmt: skip
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate, print the trainer config and launch command; start nothing.")
]
PlanOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate and print the plan (models, data, sampling, files); load nothing.")
]
StageOpt = Annotated[
    Optional[str],
    typer.Option("--stage", help="sft, rm, ppo, dpo, kto, eval or generate; default: the recipe's own `stage:` "
                 "key."),
]


def _fail(message: str, code: int = 2) -> None:
    from rlhf_cli.console import make_console
    from rich.markup import escape

    # escape: a message quoting data ("columns [text]") must not be read as rich markup and lose the brackets
    make_console(stderr=True, soft_wrap=True).print(f"[bold red]Error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def user_errors(command):
    """Turn UserError into one paragraph on stderr and exit code 2, Ctrl-C/SIGTERM into one line and 130, and any
    other failure into one paragraph and exit 1 (RLHF_CLI_TRACEBACK=1 shows the traceback instead)."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        import os

        from rlhf_cli import interrupts

        interrupts.install()
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("Interrupted; nothing half-made was left behind (a saved checkpoint continues with --resume).",
                  code=130)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:
            if interrupts.requested():  # a library turned the Ctrl-C into its own error
                _fail("Interrupted.", code=130)
            if os.environ.get("RLHF_CLI_TRACEBACK"):
                raise
            _fail(f"Unexpected {type(exc).__name__}: {exc}. This is a bug in rlhf-cli or a library it uses; run "
                  "again with RLHF_CLI_TRACEBACK=1 to see where it happened, and report it.", code=1)

    return wrapper


def _run(stage_name: str, recipe: str, overrides, output_dir, overwrite, resume, dry_run) -> None:
    from functools import partial

    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages import stage_for
    from rlhf_cli.stages.common import run_stage
    from rlhf_cli.stages.ppo import run_ppo

    loaded = load_recipe(recipe, stage_name, overrides or [])
    run = run_ppo if stage_name == "ppo" else partial(run_stage, stage_for(loaded, stage_name))
    code = run(loaded, output_dir=output_dir, overwrite=overwrite, resume=resume, dry_run=dry_run,
               cli_argv=["rlhf", *sys.argv[1:]])  # fmt: skip
    if code:
        raise typer.Exit(code)


def _training_command(stage_name: str, command: str, help_text: str) -> None:
    """Register `rlhf COMMAND RECIPE`, a training stage: the options every training stage takes, then `_run`."""

    def train_command(
        recipe: RecipeArg,
        overrides: SetOpt = None,
        output_dir: OutputOpt = None,
        overwrite: OverwriteOpt = False,
        resume: ResumeOpt = False,
        dry_run: DryRunOpt = False,
    ) -> None:
        _run(stage_name, recipe, overrides, output_dir, overwrite, resume, dry_run)

    train_command.__name__ = train_command.__qualname__ = command.replace("-", "_")
    train_command.__doc__ = help_text
    app.command(command)(user_errors(train_command))


_training_command("sft", "sft", """Supervised fine-tuning on demonstrations (TRL SFTTrainer).

    Data: text, prompt/completion, messages, alpaca, sharegpt or hh (the chosen transcript) rows. Saves a causal LM and its tokenizer.
    """)
_training_command("rm", "train-rm", """Train a Bradley-Terry reward model on preference pairs (TRL RewardTrainer).

    Data: chosen/rejected pairs (TRL, sharegpt, alpaca or Anthropic hh). Saves a one-output sequence classifier
    that loads with AutoModelForSequenceClassification. `ensemble:` trains several members in one command.
    """)
_training_command("ppo", "ppo", """PPO against a reward model (or a rule function), KL-anchored to the reference policy.

    Four models: policy and critic train, reference and reward model stay frozen. Data: prompts. Saves the policy
    (and the critic in critic/).
    """)
_training_command("dpo", "dpo", """Direct preference optimisation of the policy on preference pairs (TRL DPOTrainer; ORPO, SimPO).

    Against a frozen reference, every TRL loss_type; `dpo.algorithm: orpo | simpo` for the reference-free variants.
    Data: any preference format train-rm reads (pairs with or without a prompt, conversations, HH transcripts, two
    outputs + a winner column, rankings). Saves a causal LM that loads with AutoModelForCausalLM. See docs/dpo.md.
    """)
_training_command("kto", "kto", """KTO: train the policy on unpaired thumbs-up / thumbs-down rows against a frozen reference (TRL KTOTrainer).

    Data: prompt + completion + a boolean label, or preference pairs (each split into a desirable and an
    undesirable row). Class weights follow the label balance unless training: sets them. See docs/dpo.md.
    """)


@app.command("eval")
@user_errors
def evaluate(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output_dir: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: PlanOpt = False,
) -> None:
    """Evaluate a policy against a reference, and a reward model on preference pairs; write a report.

    Each part runs when the recipe's `eval:` section names its data: prompts, preferences, demonstrations, ppo_run. Writes eval.json, report.md, PNG plots and samples.jsonl.
    """
    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages.evaluate import run_eval

    loaded = load_recipe(recipe, "eval", overrides or [])
    raise typer.Exit(run_eval(loaded, output_dir=output_dir, overwrite=overwrite, dry_run=dry_run))


@app.command()
@user_errors
def generate(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output_dir: OutputOpt = None,
    overwrite: OverwriteOpt = False,
    dry_run: PlanOpt = False,
) -> None:
    """Sample completions of a model for a prompt file into generations.jsonl (optionally scored by a reward).

    Each line holds a prompt and one completion in prompt/completion form: the file is also SFT data, and several scored samples per prompt make new preference pairs.
    """
    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages.generate import run_generate

    loaded = load_recipe(recipe, "generate", overrides or [])
    raise typer.Exit(run_generate(loaded, output_dir=output_dir, overwrite=overwrite, dry_run=dry_run))


@app.command()
@user_errors
def label(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    output_dir: OutputOpt = None,
    annotator: Annotated[Optional[str], typer.Option(
        "--annotator", help="human labeller: who is answering (recorded with every answer; several people split "
        "the items, sharing label.labeller.overlap for agreement).")] = None,
    append: Annotated[bool, typer.Option(
        "--append", help="Add to a labelling session made by a different recipe in the same output directory "
        "(refused otherwise, so sessions are not mixed by accident).")] = False,
    report: Annotated[bool, typer.Option(
        "--report", help="Rebuild the output rows and the label report (agreement between annotators included) "
        "from the answers so far; label nothing.")] = False,
    overwrite: OverwriteOpt = False,
    dry_run: PlanOpt = False,
) -> None:
    """Make preference data: K responses per prompt compared by a person, an AI judge, reward models or a rule.

    Candidates are sampled from the policy (or read from a file); the judge works under a written constitution.

    Writes preferences.jsonl (prompt/chosen/rejected: rlhf train-rm and rlhf dpo read it as it is) or kto.jsonl,
    and label_report.json/.md (counts, ties, agreement, position bias, length bias). A person's answers are saved as
    they are given: run the same command again to continue. `label.mode: revise` writes critiqued-and-revised SFT
    rows instead. See docs/label.md.
    """
    from rlhf_cli.recipe import load_recipe
    from rlhf_cli.stages.label import run_label

    loaded = load_recipe(recipe, "label", overrides or [])
    raise typer.Exit(run_label(loaded, output_dir=output_dir, overwrite=overwrite, dry_run=dry_run,
                               annotator=annotator, append=append, report_only=report))  # fmt: skip


@app.command()
@user_errors
def pipeline(
    recipe: Annotated[str, typer.Argument(help="Path to the pipeline recipe (shared keys + stages:).", show_default=False)],
    overrides: SetOpt = None,
    output_dir: OutputOpt = None,
    from_stage: Annotated[
        Optional[str], typer.Option("--from", help="Re-run this stage and every later stage that reads its output "
                                    "(a stage of the recipe's route: sft, rm, ppo, dpo, kto, eval; with rounds: "
                                    "round-K.label, round-K.rm, ..., or round-K for the round's first stage).")
    ] = None,
    only: Annotated[Optional[str], typer.Option("--only", help="Run only this stage, on the outputs already there.")] = None,
    annotator: Annotated[Optional[str], typer.Option("--annotator", help="Your name, for a pipeline whose rounds have "
                                                     "a human labeller (it pauses at each label stage).")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """SFT, then PPO against a reward model, DPO or KTO, then eval, from one recipe, each stage's output wired into
    the next.

    The stage sections present choose the route: sft -> rm -> ppo -> eval, sft -> dpo -> eval, sft -> kto -> eval,
    or sft -> rm -> ppo + dpo -> eval (one eval comparing both policies). With `rounds: N` and a stages.label
    section, each round labels its policy's samples, adds the pairs to the data and trains again. Every stage recipe and every hand-off (tokenizers, chat template, pad token, LoRA vs merged weights, lengths) is
    checked before anything trains. Finished stages whose recipe and inputs are unchanged are skipped; an
    interrupted stage resumes from its checkpoint. See docs/pipeline.md.
    """
    from rlhf_cli.pipeline import run_pipeline

    code = run_pipeline(recipe, overrides=overrides or [], output_dir=output_dir, from_stage=from_stage, only=only,
                        dry_run=dry_run, annotator=annotator)  # fmt: skip
    if code:
        raise typer.Exit(code)


def _load_for_inspection(recipe: str, stage: str | None, overrides):
    from rlhf_cli.recipe import RECIPE_STAGES, apply_overrides, read_recipe_file, validate_recipe
    from pathlib import Path

    raw = apply_overrides(read_recipe_file(recipe), overrides or [])
    chosen = stage or raw.get("stage")
    if chosen not in RECIPE_STAGES:
        raise UserError(
            f"{recipe}: cannot tell which stage this recipe is for; add `stage:` (sft, rm, ppo, dpo, kto, eval or "
            "generate) to it, or pass --stage."
        )
    loaded = validate_recipe(raw, chosen, source=recipe, base_dir=Path(recipe).resolve().parent)
    _check_hardware_for_inspection(loaded)
    return loaded


def _check_hardware_for_inspection(loaded, where: str = "") -> None:
    if loaded.distributed.strategy != "none" or loaded.training.get("bf16") is True:
        from rlhf_cli.launch import Hardware
        from rlhf_cli.preflight import check_hardware

        # imports torch, only when the recipe asks for more than one CPU process
        try:
            note = check_hardware(loaded, Hardware.detect(), planning=True)
        except UserError as exc:
            raise UserError(f"{where}{exc}") from None
        if note:
            typer.echo(f"Note: {where}{note}", err=True)


def _pipeline_for_inspection(recipe: str, stage: str | None, overrides):
    """For a pipeline recipe (one with `stages:`, or --stage pipeline): (output directory, stages), every stage
    recipe built and checked by the pipeline's own code, as `rlhf pipeline` does before it runs anything; a stage
    name as --stage keeps that stage only. None for a single-stage recipe."""
    from rlhf_cli.pipeline import STAGE_ORDER, validate_pipeline
    from rlhf_cli.recipe import read_recipe_file

    if stage != "pipeline" and "stages" not in read_recipe_file(recipe):
        return None
    if stage not in (None, "pipeline", *STAGE_ORDER):
        raise UserError(f"{recipe} is a pipeline recipe (it has `stages:`); --stage takes pipeline or one of its "
                        f"stages ({', '.join(STAGE_ORDER)}), not {stage}.")  # fmt: skip
    out, stages = validate_pipeline(recipe, overrides or [])
    for one in stages:
        _check_hardware_for_inspection(one.recipe, where=f"Stage {one.name}: ")
    if stage in STAGE_ORDER:
        stages = [one for one in stages if one.name == stage]
        if not stages:
            raise UserError(f"{recipe}: this pipeline has no stage {stage}.")
    return out, stages


RecipeStageOpt = Annotated[
    Optional[str],
    typer.Option("--stage", help="sft, rm, ppo, dpo, kto, eval, generate or pipeline; default: the recipe's own `stage:` key "
                 "(a recipe with `stages:` is a pipeline). On a pipeline recipe a stage name keeps that stage."),
]
PipelineOutputOpt = Annotated[
    Optional[str], typer.Option("--output-dir", "-o", help="Run directory; overrides the recipe's output_dir "
                                "(a pipeline's stage outputs go under it, as with `rlhf pipeline -o`).")
]


@recipe_app.command("validate")
@user_errors
def recipe_validate(recipe: RecipeArg, stage: RecipeStageOpt = None, overrides: SetOpt = None,
                    output_dir: PipelineOutputOpt = None) -> None:  # fmt: skip
    """Check a recipe: keys, types, TRL training fields, paths. Loads no model and no data.

    A pipeline recipe: every stage is built, validated and its hand-offs checked as `rlhf pipeline` does first;
    one OK line per stage.
    """
    if output_dir is not None:
        overrides = [*(overrides or []), f"output_dir={output_dir}"]
    pipeline = _pipeline_for_inspection(recipe, stage, overrides)
    if pipeline is not None:
        from rlhf_cli.pipeline import reads_from
        from rlhf_cli.recipe import COMMANDS

        out, stages = pipeline
        for one in stages:
            reads = [f"{key.removesuffix('.name_or_path')} from stage {source}"
                     for key, source in reads_from(one, out).items()]  # fmt: skip
            if one.recipe.model is not None and not any(item.startswith("model from") for item in reads):
                reads.insert(0, f"model {one.recipe.model.name_or_path}")
            typer.echo(f"{recipe}: stage {one.name} OK ({COMMANDS[one.kind]}; {', '.join(reads)}) -> {one.run_dir}")
        return
    loaded = _load_for_inspection(recipe, stage, overrides)
    model = f"model {loaded.model.name_or_path}" if loaded.model else "no policy model"
    typer.echo(f"{recipe}: OK ({loaded.stage or stage} recipe, {model})")


@recipe_app.command("show")
@user_errors
def recipe_show(
    recipe: Annotated[Optional[str], typer.Argument(help="Path to the YAML recipe.", show_default=False)] = None,
    stage: RecipeStageOpt = None,
    overrides: SetOpt = None,
    output_dir: PipelineOutputOpt = None,
    defaults: Annotated[bool, typer.Option("--defaults", help="List every recipe key with its default and help.")] = False,
) -> None:
    """Print the fully resolved recipe (defaults filled in, paths absolute), or with --defaults every key.

    A pipeline recipe: each stage's resolved recipe as the pipeline builds it, one YAML document per stage, each
    headed by a comment line naming the stage.
    """
    from rlhf_cli.recipe import describe_keys, recipe_to_yaml

    if defaults:
        from rlhf_cli.console import make_console
        from rich.table import Table

        table = Table("key", "default", "meaning", title="Recipe keys", title_justify="left")
        from rich.markup import escape

        for key, default, meaning in describe_keys():
            table.add_row(key, escape(default), escape(meaning))  # "[output_1, output_2]" is text, not markup
        make_console().print(table)
        return
    if recipe is None:
        raise UserError("Give a recipe file, or --defaults to list every key.")
    if output_dir is not None:
        overrides = [*(overrides or []), f"output_dir={output_dir}"]
    pipeline = _pipeline_for_inspection(recipe, stage, overrides)
    if pipeline is not None:
        from rlhf_cli.recipe import COMMANDS

        documents = [f"# stage {one.name} ({COMMANDS[one.kind]}) -> {one.run_dir}\n{recipe_to_yaml(one.recipe)}"
                     for one in pipeline[1]]  # fmt: skip
        typer.echo("---\n".join(documents), nl=False)
        return
    typer.echo(recipe_to_yaml(_load_for_inspection(recipe, stage, overrides)), nl=False)


@data_app.command("inspect")
@user_errors
def data_inspect(
    recipe: RecipeArg,
    stage: StageOpt = None,
    overrides: SetOpt = None,
    examples: Annotated[int, typer.Option("--examples", "-n", min=0, help="Rendered examples per data source.")] = 2,
) -> None:
    """Show each data source of a recipe as the trainer will see it: format, columns, rows read/kept/dropped, token
    lengths against max_length with what data.on_too_long does, and rendered examples (chat template applied,
    after truncation). Loads tokenizers only, no model weights."""
    from rlhf_cli.inspect_data import inspect_recipe

    loaded = _load_for_inspection(recipe, stage, overrides)
    print("\n".join(inspect_recipe(loaded, stage or loaded.stage, examples=examples)), flush=True)


def main() -> None:
    interrupts.install(early=True)  # SIGTERM during start-up: exit 130 with a line, not a silent 143
    try:
        app()
    finally:
        interrupts.ignore_from_now()  # the command has ended: a late Ctrl-C must not kill the exit half way


if __name__ == "__main__":
    main()
