"""The transfer job's settings and option checks, and the methods it runs.

The compared methods are the job's own baselines (`linear`: frozen backbone,
trained head; `full`: full fine-tune) followed by every adapter method in
the method registry (`keras_adaptive_lora.core.method`), in registration
order; `scratch` (the same architecture trained from a random init) is an
optional reference row. No adapter method is named here: a method that
registers itself is compared too.
"""

import math

import numpy as np

from keras_adaptive_lora import methods as _methods  # noqa: F401  (registers the built-in methods)
from keras_adaptive_lora import methods  # noqa: F401  (registers the built-in methods)
from keras_adaptive_lora.core.method import get_method, method_names

# The job's own methods (not adapters), with their display names.
BASELINES = ("linear", "full")
# A reference row: the same architecture trained from a random init.
REFERENCE_METHODS = ("scratch",)
BASELINE_TITLES = {
    "linear": "linear probe",
    "full": "full fine-tune",
    "scratch": "from scratch",
}
HEAD = "predictions"  # the Dense head of ViTImageClassifier

# The offline backbone and source task (default, and `--quick`).
OFFLINE = {
    "default": {
        "image_size": 32,
        "patch_size": 8,
        "num_layers": 3,
        "num_heads": 4,
        "hidden_dim": 64,
        "mlp_dim": 128,
        # 3,000 pre-training steps (batch 64). With 2,000 (16,000 images)
        # the source-task accuracy fell from 0.76 to 0.64 and every
        # pre-trained method lost 5-8 points on the target task.
        "source_images": 24000,
        "source_val_images": 1000,
        "pretrain_epochs": 8,
        "pretrain_batch_size": 64,
        "pretrain_learning_rate": 4e-3,
        "shots": 10,
        # 900 steps: at 20 epochs (300 steps) the linear probe and the
        # per-layer-rank adapters are still far from converged on this task.
        "epochs": 60,
        "batch_size": 4,
        "test_size": 600,
    },
    "quick": {
        "image_size": 16,
        "patch_size": 8,
        "num_layers": 1,
        "num_heads": 2,
        # Hidden 64 (as the default), not smaller: a matched budget needs
        # ranks of about 8 for the methods' parameter counts to land within
        # 5% of each other (their granularity is one rank of every layer).
        "hidden_dim": 64,
        "mlp_dim": 128,
        "source_images": 64,
        "source_val_images": 16,
        "pretrain_epochs": 1,
        "pretrain_batch_size": 32,
        "pretrain_learning_rate": 3e-3,
        "shots": 2,
        "epochs": 1,
        "batch_size": 4,
        "test_size": 24,
    },
}
# Real mode (a preset and/or a tfds dataset): the SR-LoRA paper's settings.
REAL = {"shots": 1, "epochs": 20, "batch_size": 4}
# Seeds run by default: a few, for a mean and a standard error.
DEFAULT_SEEDS = {"default": (0, 1, 2), "quick": (0, 1), "real": (0, 1, 2)}
# `--budget`: `same` (every adapter method on the same layers with the same
# adapter-parameter count, see `budget.py`) or `free` (each method's defaults).
BUDGETS = ("same", "free")
# Written into the preset folder of the offline pre-training: a later
# `--preset` of that folder keeps the offline settings it was made with.
PRETRAINING_FILE = "transfer_pretraining.json"
TARGET_DESCRIPTION = "shapes in a stain-like imaging domain"
SOURCE_SEED = 0  # the generated data are fixed, like a real dataset;
TARGET_SEED = 1  # `seed` chooses the few-shot sample and the inits.
EVAL_BATCH_SIZE = 64
PROBE_SIZE = 8
ROLE_ORDER = ("query", "key", "value", "attention_output", "dense_1", "dense_2")


# --------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------
def compared_methods():
    """The compared methods in table order (the default selection, without
    the reference): the baselines, then every registered adapter method."""
    return BASELINES + tuple(method_names())


def all_methods():
    """Every name `parse_methods` accepts, in table order."""
    return compared_methods() + REFERENCE_METHODS


def is_adapter_method(method):
    """Whether `method` is a registered adapter method (not a job baseline)."""
    return method not in BASELINES + REFERENCE_METHODS and method in method_names()


def title(method):
    """The display name of a method (a baseline's, or the registry's `title`)."""
    if method in BASELINE_TITLES:
        return BASELINE_TITLES[method]
    return get_method(method).title


def adapter_titles():
    """The display names of the registered adapter methods, in order."""
    return tuple(get_method(name).title for name in method_names())


def parse_methods(methods, *, offline=True):
    """The method names to run, in table order, without duplicates.

    Args:
        methods: None or `"all"` (the baselines and every registered adapter
            method, plus `scratch` when `offline`), a comma-separated string,
            or a list of names from `all_methods()`.
        offline: whether the backbone is pre-trained in the run (then the
            default adds the `scratch` reference). Defaults to True.

    Returns:
        A tuple of method names.
    """
    order = all_methods()
    default = compared_methods() + (REFERENCE_METHODS if offline else ())
    if methods is None:
        return default
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names = []
    for name in methods:
        if not isinstance(name, str):
            raise ValueError(f"Method names must be strings, got {name!r}.")
        expanded = default if name.lower() == "all" else (name.lower(),)
        for item in expanded:
            if item not in order:
                raise ValueError(
                    f"Unknown method {item!r}. Choose from {', '.join(order)} "
                    "(comma-separated), or 'all'."
                )
            if item not in names:
                names.append(item)
    if not names:
        raise ValueError(f"No method selected; choose from {', '.join(order)}.")
    return tuple(sorted(names, key=order.index))


# --------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------
def positive_int(name, value, minimum=1):
    """`value` as an int, checked to be an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def positive_float(name, value, allow_zero=False):
    """`value` as a float, checked to be finite and > 0 (>= 0 with `allow_zero`)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"`{name}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}."
        )
    return value


def parse_seeds(seeds):
    """Seeds as a tuple of distinct integers >= 0, from an int, a
    comma-separated string (`"0,1,2"`) or a list."""
    if isinstance(seeds, str):
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"`seeds` must be comma-separated integers such as 0,1,2, got {seeds!r}."
            ) from None
    elif isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [seeds]
    out = []
    for seed in seeds:
        seed = positive_int("seeds", seed, minimum=0)
        if seed not in out:
            out.append(seed)
    if not out:
        raise ValueError("`seeds` is empty; give at least one seed, e.g. 0,1,2.")
    return tuple(out)


def parse_targets(targets):
    """None, or a list of layer names / path patterns from a comma-separated
    string or a list."""
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"`targets` must be layer names such as query,value; got {targets!r}.")
    return targets


def check_budget(budget):
    """`budget` checked to be one of `BUDGETS`."""
    if budget not in BUDGETS:
        raise ValueError(f"`budget` must be one of {', '.join(BUDGETS)}, got {budget!r}.")
    return budget
