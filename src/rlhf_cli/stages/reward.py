"""`rlhf train-rm`: a Bradley-Terry reward model with TRL's RewardTrainer.

The model is a sequence classifier with one output, read at the last real token. The loss on a preference pair is
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
so that exp(r) behaves like a Bradley-Terry strength.

Without evaluation data the stage holds 5% of the pairs out (`default_eval_split`) and reports the accuracy on
them: the training-batch accuracy TRL logs says how well the pairs are memorised, not how well the model ranks
pairs it has not seen.
"""

from rlhf_cli.errors import UserError
from rlhf_cli.rewards import ENSEMBLE_FILE
from rlhf_cli.stages.common import Default, Stage

REWARD = Stage(
    name="rm",
    title="Reward model",
    data_kind="preference",
    model_kind="reward",
    config_class="RewardConfig",
    trainer_class="RewardTrainer",
    default_eval_split=0.05,
    sized_cadence=True,
    training_defaults={
        "num_train_epochs": Default(
            1, "One pass over the pairs: reward models overfit from the second epoch on; InstructGPT (Ouyang et al. "
            "2022) and Llama 2 (Touvron et al. 2023) train theirs for one epoch, as does TRL's reward-modeling example."
        ),
        "learning_rate": Default(
            1e-5, "TRL's reward-modeling example uses 1e-5 for full fine-tuning and 1e-4 with LoRA (RewardConfig's "
            "own default is the LoRA value); Llama 2's reward models used 1e-5 (5e-6 at 70B), InstructGPT's 9e-6.",
            lora=1e-4,
        ),
    },
)


# ---------------------------------------------------------------- ensembles (recipe `ensemble:`)

_MEMBER_DONE = "rendering.json"  # written last, after the member's weights: the member is complete


def member_dir(run_dir, k: int):
    return run_dir / f"member-{k}"


def ensemble_has_work(run_dir) -> bool:
    """What --resume can continue: a finished member, or a member with a complete checkpoint."""
    from rlhf_cli.rundir import last_checkpoint

    return any((path / _MEMBER_DONE).is_file() or last_checkpoint(path) is not None
               for path in run_dir.glob("member-*") if path.is_dir())  # fmt: skip


def bootstrap_indices(rows: int, seed: int) -> list[int]:
    """A resample with replacement of `rows` row numbers, drawn by random.Random(seed): the bootstrap of one member."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(rows) for _ in range(rows)]


def run_ensemble(stage, recipe, run_dir, plan, *, overwrite: bool, resume: bool) -> int:
    """Train `ensemble.members` reward models one after another into RUN/member-k/ and write RUN/ensemble.json.

    Member k trains with seed = seed + k (model initialisation of a builtin model, data order, dropout) and, with
    `bootstrap`, on a resample with replacement of the training rows drawn by seed + k. The held-out rows are split
    off once, by `seed`, before any resampling: every member is measured on the same pairs.

    --resume keeps the finished members (those with rendering.json), continues an interrupted member from its last
    complete checkpoint, and trains the members not yet started. --overwrite replaces the whole run.
    """
    import dataclasses
    import json
    import shutil

    from rlhf_cli.launch import RESOLVED_RECIPE
    from rlhf_cli.recipe import recipe_to_yaml
    from rlhf_cli.rundir import RunDirectory, last_checkpoint, print_summary, write_summary
    from rlhf_cli.stages.common import load_stage_data, trainer_config_kwargs, train, write_resolved_recipe

    spec = recipe.ensemble
    if plan.distributed:
        raise UserError("An `ensemble:` trains its members one after another in this process: set "
                        "distributed.strategy: none (and num_processes 1), or train each member as its own run "
                        "with a different seed and list them under a reward's `models:`.")  # fmt: skip
    with RunDirectory(run_dir, overwrite=overwrite, resume=resume, keep=ensemble_has_work) as run:
        data = load_stage_data(stage, recipe)
        rows = len(data.train)
        members = []
        run.create()
        write_resolved_recipe(run, recipe)
        for k in range(spec.members):
            path = member_dir(run_dir, k)
            seed = recipe.seed + k
            member = {"member": k, "path": path.name, "seed": seed}
            member_data = data
            if spec.bootstrap:
                indices = bootstrap_indices(rows, seed)
                member_data = dataclasses.replace(data, train=data.train.select(indices))
                member.update({"train rows (resampled)": rows, "distinct rows": len(set(indices))})
            if resume and (path / _MEMBER_DONE).is_file():
                print(f"Ensemble member-{k}: finished earlier, kept ({path}).")
            else:
                continuing = resume and last_checkpoint(path) is not None
                if path.exists() and not continuing:
                    shutil.rmtree(path)  # a member of this run that saved nothing to continue from
                path.mkdir(parents=True, exist_ok=True)
                member_recipe = recipe.model_copy(update={"seed": seed, "ensemble": None, "output_dir": str(path)})
                (path / RESOLVED_RECIPE).write_text(recipe_to_yaml(member_recipe), encoding="utf-8")
                print(f"Ensemble member-{k} ({k + 1} of {spec.members}): seed {seed}"
                      f"{', bootstrap resample of ' + str(rows) + ' rows' if spec.bootstrap else ''} -> {path}")
                config_kwargs = trainer_config_kwargs(stage, member_recipe, path, plan, member_data)
                code = train(stage, member_recipe, path, config_kwargs, member_data, resume=continuing, run=None)
                if code != 0:
                    if code == 130:
                        print("The finished members are kept; the same command with --resume continues member "
                              f"{k} and trains the rest.")  # fmt: skip
                    return run.finish(code)
            summary_file = path / "summary.json"
            summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.is_file() else {}
            member["held-out accuracy"] = summary.get("held-out accuracy")
            members.append(member)
        accuracies = [m["held-out accuracy"] for m in members if m["held-out accuracy"] is not None]
        record = {"members": [m["path"] for m in members], "seeds": [m["seed"] for m in members],
                  "bootstrap": spec.bootstrap, "held-out rows": len(data.eval) if data.eval is not None else 0,
                  "details": members}  # fmt: skip
        (run_dir / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        summary = {"stage": "rm", "ensemble members": spec.members, "bootstrap": spec.bootstrap,
                   "seeds": ", ".join(str(m["seed"]) for m in members)}  # fmt: skip
        if accuracies:
            summary.update({"held-out accuracy (mean of members)": sum(accuracies) / len(accuracies),
                            "held-out accuracy (min member)": min(accuracies),
                            "held-out accuracy (max member)": max(accuracies)})  # fmt: skip
        if data.eval is not None and len(data.eval):
            own = ensemble_accuracy(run_dir, data.eval)
            summary["held-out accuracy (ensemble, mean combine)"] = own
            record["held-out accuracy (ensemble, mean combine)"] = own
            (run_dir / ENSEMBLE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        summary["output"] = str(run_dir)
        write_summary(run_dir, summary)
        print_summary("Reward-model ensemble: done", summary)
        return run.finish(0)


def ensemble_accuracy(run_dir, pairs, batch_size: int = 16) -> float:
    """The share of held-out pairs whose chosen response the ensemble (mean of its members' scores) scores above
    the rejected one: each pair read as the members were trained (rendering.json), ties counted as wrong."""
    from trl.data_utils import is_conversational

    from rlhf_cli.inference import chunks, load_scorer
    from rlhf_cli.recipe import RewardSpec

    scorer = load_scorer(RewardSpec(model=str(run_dir)), "ensemble", None, None,
                         conversational=is_conversational(pairs[0]))  # fmt: skip
    reader, right = scorer.reader, 0
    for rows in chunks(len(pairs), batch_size):
        sequences = []
        for i in rows:
            sequences += reader.cut(reader.encode_pair(pairs[i]))  # chosen, rejected
        values = reader.score_sequences(None, sequences, None, batch_size=len(sequences))
        right += sum(chosen > rejected for chosen, rejected in zip(values[0::2], values[1::2]))
    return right / len(pairs)
