"""Fields of TRL's config dataclasses, read from the installed source without importing it.

Importing `trl.SFTConfig` pulls in torch and transformers (seconds). Parsing the dataclass definitions with `ast`
takes milliseconds and always matches the installed TRL, so every `training:` key is checked, with its type and
a did-you-mean, before anything slow is imported.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

# Where each config class lives, relative to its package root, and how its bases are found.
_CONFIG_FILES = {
    "SFTConfig": ("trl", "trainer/sft_config.py"),
    "RewardConfig": ("trl", "trainer/reward_config.py"),
    "DPOConfig": ("trl", "trainer/dpo_config.py"),
    "KTOConfig": ("trl", "trainer/kto_config.py"),
    "ORPOConfig": ("trl", "experimental/orpo/orpo_config.py"),
    "CPOConfig": ("trl", "experimental/cpo/cpo_config.py"),
    "GRPOConfig": ("trl", "trainer/grpo_config.py"),
    "RLOOConfig": ("trl", "trainer/rloo_config.py"),
    "_BaseConfig": ("trl", "trainer/base_config.py"),
    "TrainingArguments": ("transformers", "training_args.py"),
}

# Sanity bounds for the keys people most often get wrong; TRL itself accepts nonsense like a negative lr.
_BOUNDS: dict[str, tuple[str, float]] = {
    "learning_rate": (">", 0),
    "num_train_epochs": (">", 0),
    "per_device_train_batch_size": (">=", 1),
    "per_device_eval_batch_size": (">=", 1),
    "gradient_accumulation_steps": (">=", 1),
    "logging_steps": (">", 0),
    "save_steps": (">", 0),
    "eval_steps": (">", 0),
    "weight_decay": (">=", 0),
    "warmup_steps": (">=", 0),
    "max_grad_norm": (">=", 0),
    "save_total_limit": (">=", 1),
    "dataloader_num_workers": (">=", 0),
    # PPOConfig
    "steps": (">=", 1),
    "rollout_batch_size": (">=", 1),
    "mini_batch_size": (">=", 1),
    "ppo_epochs": (">=", 1),
    "response_length": (">=", 1),
    "temperature": (">", 0),
    "top_p": (">", 0),
    "kl_horizon": (">=", 1),
    "kl_coef": (">=", 0),
    "cliprange": (">", 0),
    "cliprange_value": (">", 0),
    "vf_coef": (">=", 0),
    "gamma": (">=", 0),
    "lam": (">=", 0),
}


def _package_root(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # top-level only: does not import the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _class_fields(class_name: str) -> dict[str, tuple[str, ast.expr | None]]:
    """Map field name -> (annotation source, default expression) for a config class, bases included."""
    package, relative = _CONFIG_FILES[class_name]
    root = _package_root(package)
    if root is None or not (root / relative).is_file():
        raise RuntimeError(f"cannot find {package} source for {class_name}; is {package} installed?")
    tree = ast.parse((root / relative).read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields: dict[str, tuple[str, ast.expr | None]] = {}
    for base in node.bases:
        base_name = ast.unparse(base)
        if base_name in _CONFIG_FILES:
            fields.update(_class_fields(base_name))
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            fields[stmt.target.id] = (ast.unparse(stmt.annotation), _default_expr(stmt.value))
    return fields


def _default_expr(value: ast.expr | None) -> ast.expr | None:
    """`x: int = 3` -> 3; `x: int = field(default=3, ...)` -> 3."""
    if isinstance(value, ast.Call) and ast.unparse(value.func) in ("field", "dataclasses.field"):
        return next((kw.value for kw in value.keywords if kw.arg == "default"), None)
    return value


def config_fields(class_name: str) -> dict[str, str]:
    """Map field name -> annotation source text for a TRL/transformers config class, bases included."""
    if class_name == "PPOConfig":  # our own, standard library only
        from rlhf_cli.ppo.config import ppo_fields

        return ppo_fields()
    return {name: annotation for name, (annotation, _) in _class_fields(class_name).items()}


def config_default(class_name: str, key: str):
    """The literal default of one field (None when it has none or it is not a literal)."""
    if class_name == "PPOConfig":
        from rlhf_cli.ppo.config import PPOConfig

        return {f.name: f.default for f in fields(PPOConfig)}[key]
    _, expr = _class_fields(class_name)[key]
    try:
        return ast.literal_eval(expr) if expr is not None else None
    except ValueError:
        return None


def _type_atoms(annotation: str) -> list[str]:
    """'float | None' -> ['float', 'None']; 'Optional[int]' -> ['int', 'None']; 'list[str]' -> ['list']."""
    text = annotation.replace(" ", "")
    if text.startswith("Optional[") and text.endswith("]"):
        return [*_type_atoms(text[len("Optional[") : -1]), "None"]
    if text.startswith("Union[") and text.endswith("]"):
        text = text[len("Union[") : -1].replace(",", "|")
    atoms, depth, current = [], 0, ""
    for char in text:
        depth += char == "["
        depth -= char == "]"
        if char == "|" and depth == 0:
            atoms.append(current)
            current = ""
        else:
            current += char
    atoms.append(current)
    return [atom.split("[", 1)[0] for atom in atoms]


_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "None": lambda v: v is None,
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


# Enum types of TrainingArguments fields, and the transformers file that defines each (read with ast, like fields).
_ENUM_FILES = {
    "IntervalStrategy": "trainer_utils.py",
    "SaveStrategy": "trainer_utils.py",
    "HubStrategy": "trainer_utils.py",
    "SchedulerType": "trainer_utils.py",
    "OptimizerNames": "training_args.py",
}


@cache
def enum_values(enum_name: str) -> tuple[str, ...]:
    """The string values of one of transformers' ExplicitEnum classes, without importing transformers."""
    root = _package_root("transformers")
    if root is None or enum_name not in _ENUM_FILES:
        return ()
    tree = ast.parse((root / _ENUM_FILES[enum_name]).read_text(encoding="utf-8"))
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == enum_name), None)
    if node is None:
        return ()
    return tuple(stmt.value.value for stmt in node.body if isinstance(stmt, ast.Assign)
                 and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str))  # fmt: skip


def _enum_problem(key: str, annotation: str, value: Any) -> str | None:
    """A string that is not one of the enum's values (e.g. save_strategy: 'never')."""
    for atom in _type_atoms(annotation):
        allowed = enum_values(atom)
        if allowed and isinstance(value, str) and value not in allowed:
            close = difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            return f"training.{key}: {value!r} is not one of {', '.join(allowed)}.{hint}"
    return None


def value_matches(annotation: str, value: Any) -> bool:
    """True when `value` fits `annotation`; annotations naming other types (enums, classes) accept anything."""
    atoms = _type_atoms(annotation)
    if any(atom not in _CHECKS for atom in atoms):
        return True
    return any(_CHECKS[atom](value) for atom in atoms)


# Bounds that hold for one config's meaning of a key (GRPO's beta may be 0; DPO's must be positive).
_CLASS_BOUNDS: dict[tuple[str, str], tuple[str, float]] = {
    **{(config, "beta"): (">", 0) for config in ("DPOConfig", "KTOConfig", "ORPOConfig", "CPOConfig")},
    ("CPOConfig", "cpo_alpha"): (">=", 0),
    ("KTOConfig", "desirable_weight"): (">", 0),
    ("KTOConfig", "undesirable_weight"): (">", 0),
}

# Values a config takes beyond its annotation, because its __post_init__ converts them.
_ALSO_ACCEPTED = {("DPOConfig", "loss_type"): "str"}  # one loss type, wrapped in a list


def check_training_keys(class_name: str, training: dict[str, Any]) -> list[str]:
    """Problems with a recipe's `training:` mapping for TRL's `class_name`, one sentence each."""
    fields = config_fields(class_name)
    problems = []
    for key, value in training.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"training.{key}: not a field of {class_name}.{hint}")
            continue
        annotation = fields[key]
        if (class_name, key) in _ALSO_ACCEPTED:
            annotation = f"{annotation} | {_ALSO_ACCEPTED[class_name, key]}"
        if not value_matches(annotation, value):
            problems.append(f"training.{key}: expected {fields[key]}, got {type(value).__name__} {value!r}.")
            continue
        enum_problem = _enum_problem(key, fields[key], value)
        if enum_problem:
            problems.append(enum_problem)
            continue
        bound = _CLASS_BOUNDS.get((class_name, key), _BOUNDS.get(key))
        if bound and isinstance(value, (int, float)):
            op, limit = bound
            if (op == ">" and not value > limit) or (op == ">=" and not value >= limit):
                problems.append(f"training.{key}: must be {op} {limit:g}, got {value!r}.")
    return problems


# The trainer whose code decides which `loss_type` values a config accepts (TRL checks it only at the first step).
_LOSS_TYPE_FILES = {
    "DPOConfig": "trainer/dpo_trainer.py",
    "KTOConfig": "trainer/kto_trainer.py",
    "CPOConfig": "experimental/cpo/cpo_trainer.py",
}


@cache
def loss_types(class_name: str) -> tuple[str, ...]:
    """The `loss_type` values the installed TRL trainer of `class_name` implements: the strings its code compares
    `loss_type` with (`loss_type == "sigmoid"`, `self.loss_type in [...]`). Empty when unknown."""
    root = _package_root("trl")
    relative = _LOSS_TYPE_FILES.get(class_name)
    if root is None or relative is None or not (root / relative).is_file():
        return ()
    found: list[str] = []

    def named_loss_type(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "loss_type") or (
            isinstance(node, ast.Attribute) and node.attr == "loss_type")

    for node in ast.walk(ast.parse((root / relative).read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Compare) and named_loss_type(node.left)):
            continue
        for op, right in zip(node.ops, node.comparators):
            values = right.elts if isinstance(op, (ast.In, ast.NotIn)) and isinstance(right, (ast.List, ast.Tuple, ast.Set)) else [right]
            found += [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return tuple(dict.fromkeys(found))
