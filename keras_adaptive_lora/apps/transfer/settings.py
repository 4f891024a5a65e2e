"""The transfer job's options, checked, and the defaults of its mode.

Three modes, one code path after this:

- **offline** (no `preset`): a small ViT is pre-trained in the run on the
  generated source task (`OFFLINE["default"]`, or `OFFLINE["quick"]` with
  `quick`) and adapted to the generated target task;
- **offline, reused** (`preset` is a folder the offline pre-training wrote,
  recognized by its `PRETRAINING_FILE`): the same, without pre-training
  again, and with the same defaults as the run that wrote it;
- **real** (any other `preset`, e.g. a keras-hub preset name, and/or a tfds
  `dataset`): the SR-LoRA paper's few-shot defaults (`REAL`).

The mode and where each default came from are printed (`mode_line`).
"""

import os

from keras_adaptive_lora.apps.transfer.backbone import read_pretraining
from keras_adaptive_lora.apps.transfer.options import (
    DEFAULT_SEEDS,
    OFFLINE,
    REAL,
    check_budget,
    parse_methods,
    parse_seeds,
    parse_targets,
    positive_float,
    positive_int,
)

DEFAULTS = {
    "methods": None, "seeds": None, "seed": None, "budget": "same", "targets": None,
    "shots": None, "epochs": None, "batch_size": None, "rank": 8, "alpha": None,
    "learning_rate": 1e-3, "weight_decay": 5e-2, "output_dir": "transfer_output",
    "preset": None, "dataset": None, "data_dir": None, "image_size": None,
    "train_split": "train", "test_split": "test", "val_per_class": None, "test_size": None,
    "quick": False, "export": True, "plot": True, "verbose": 1,
}


def _mode(preset, dataset, quick):
    """`(mode, setting, pretraining record)`."""
    record = None if preset is None else read_pretraining(preset)
    if preset is None:
        return "offline", "quick" if quick else "default", None
    if record is not None:
        setting = record.get("setting", "default")
        if quick and setting != "quick":
            raise ValueError(
                f"`quick` asks for the quick offline setting, but {preset!r} was pre-trained "
                f"with the {setting!r} one. Drop `quick` (the preset's own setting is kept) "
                "or leave `preset` out."
            )
        return "reused", setting, dict(record, reused=True)
    if quick:
        raise ValueError(
            "`quick` is the smallest offline setting (a tiny ViT pre-trained in the run); "
            "it cannot be combined with `preset`. Drop one of them."
        )
    return "real", None, None


def resolve_settings(**options):
    """The job's settings from `run_transfer`'s keyword options (see
    `DEFAULTS`), checked; raises a `ValueError` naming a bad option and a
    `TypeError` for an unknown one."""
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"run_transfer() got unknown options: {', '.join(unknown)}.")
    o = dict(DEFAULTS, **options)
    mode, setting, pretraining = _mode(o["preset"], o["dataset"], o["quick"])
    offline = mode != "real"
    settings = dict(OFFLINE[setting]) if offline else None
    real_defaults = not offline or o["dataset"] is not None
    defaults = REAL if real_defaults else settings
    cfg = {"mode": mode, "setting": setting, "settings": settings, "pretraining": pretraining,
           "pretrain": mode == "offline", "preset": o["preset"], "dataset": o["dataset"]}
    cfg["methods"] = parse_methods(o["methods"], offline=offline)
    if o["seeds"] is not None and o["seed"] is not None:
        raise ValueError("Pass `seeds` (several) or `seed` (one), not both.")
    seeds = o["seeds"] if o["seeds"] is not None else o["seed"]
    cfg["seeds"] = parse_seeds(DEFAULT_SEEDS[setting or "real"] if seeds is None else seeds)
    cfg["budget"] = check_budget(o["budget"])
    cfg["targets"] = parse_targets(o["targets"])
    for name in ("shots", "epochs", "batch_size"):
        cfg[name] = positive_int(name, defaults[name] if o[name] is None else o[name])
    cfg["rank"] = positive_int("rank", o["rank"])
    cfg["alpha"] = None if o["alpha"] is None else positive_float("alpha", o["alpha"])
    cfg["learning_rate"] = positive_float("learning_rate", o["learning_rate"])
    cfg["weight_decay"] = positive_float("weight_decay", o["weight_decay"], allow_zero=True)
    cfg["val_per_class"] = (
        cfg["shots"] if o["val_per_class"] is None else positive_int("val_per_class", o["val_per_class"])
    )
    if o["test_size"] is not None:
        cfg["test_size"] = positive_int("test_size", o["test_size"])
    else:  # the generated task needs a size; a dataset has its split
        generated = (settings or OFFLINE["default"])["test_size"]
        cfg["test_size"] = generated if o["dataset"] is None else None
    verbose = o["verbose"]
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
    cfg["verbose"] = int(verbose)
    cfg["image_size"] = None
    if o["image_size"] is not None:
        cfg["image_size"] = positive_int("image_size", o["image_size"], minimum=16)
        if mode == "offline":
            patch = settings["patch_size"]
            if cfg["image_size"] % patch:
                raise ValueError(
                    f"`image_size` {cfg['image_size']} must be a multiple of the offline ViT's "
                    f"patch size {patch} (e.g. {patch * max(2, cfg['image_size'] // patch)})."
                )
            settings["image_size"] = cfg["image_size"]
    for name in ("data_dir", "train_split", "test_split", "export", "plot"):
        cfg[name] = o[name]
    cfg["export"], cfg["plot"] = bool(cfg["export"]), bool(cfg["plot"])
    cfg["output_dir"] = os.path.abspath(str(o["output_dir"]))
    cfg["mode_line"] = _mode_line(cfg, real_defaults)
    cfg["record"] = {
        **{k: cfg[k] for k in (
            "shots", "seeds", "budget", "targets", "epochs", "batch_size", "rank", "alpha",
            "learning_rate", "weight_decay", "preset", "dataset", "data_dir", "train_split",
            "test_split", "val_per_class", "test_size", "export", "plot", "mode", "setting")},
        "methods": list(cfg["methods"]), "quick": setting == "quick", "offline": offline,
    }
    return cfg


def _mode_line(cfg, real_defaults):
    which = {
        "offline": f"offline: a ViT pre-trained in this run ({cfg['setting']} setting)",
        "reused": f"offline, reusing the pre-trained ViT in {cfg['preset']} ({cfg['setting']} "
                  "setting, the defaults of the run that wrote it)",
        "real": f"real: keras-hub preset {cfg['preset']}",
    }[cfg["mode"]]
    if cfg["dataset"] is not None:
        which += f", tfds dataset {cfg['dataset']}"
    source = "the SR-LoRA paper's few-shot defaults" if real_defaults else "the offline defaults"
    return (
        f"mode {which}; {source} unless set: {cfg['shots']} shots, {cfg['epochs']} epochs, "
        f"batch {cfg['batch_size']}, seeds {','.join(str(s) for s in cfg['seeds'])}, "
        f"budget {cfg['budget']}"
    )
