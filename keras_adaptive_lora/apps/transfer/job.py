"""The transfer job: `run_transfer`, one run over the methods and seeds.

1. the mode and its defaults (offline: pre-train in the run, or reuse the
   run's own pre-trained preset with the same settings; real: a keras-hub
   preset and/or a tfds dataset), 2. the input size, 3. the backbone
   (pre-trained once per run: `backbone.py`), 4. the matched budgets
   (`budget.py`), 5. each method on each seed (`train.adapt`; the data of a
   seed from `data.py`), summarized over the seeds (`stats.py`), 6. the
   files: the table (`report.py`), the plot (`plot.py`), the export of the
   best method (`export.py`) and `results.json`.
"""

import gc
import os
import platform
import time

import keras
import numpy as np

from keras_adaptive_lora.saving._atomic import write_json
from keras_adaptive_lora.apps.transfer import stats
from keras_adaptive_lora.apps.transfer.backbone import (
    load_backbone,
    load_normalization,
    pretrain_backbone,
    read_pretraining,
)
from keras_adaptive_lora.apps.transfer.budget import match_budgets
from keras_adaptive_lora.apps.transfer.export import export_best
from keras_adaptive_lora.apps.transfer.options import (
    TARGET_DESCRIPTION,
    is_adapter_method,
    parse_methods,
)
from keras_adaptive_lora.apps.transfer.plot import save_plot
from keras_adaptive_lora.apps.transfer.progress import EpochStatus, Status, clock
from keras_adaptive_lora.apps.transfer.report import TransferResult, format_table
from keras_adaptive_lora.apps.transfer.settings import resolve_settings
from keras_adaptive_lora.apps.transfer.splits import SeedData
from keras_adaptive_lora.apps.transfer.train import adapt


def _processor():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown processor"


def machine():
    """The machine the run measured its times on: system, processor, CPU
    count and the load average (`os.getloadavg()`, 1/5/15 minutes)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "system": f"{platform.system()} {platform.machine()}",
        "processor": _processor(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in load],
    }


def _cpu_seconds():
    """CPU time of this process (all its threads) and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_transfer(**kwargs):
    """Adapt a pretrained ViT to a few-shot task with each method, over
    several seeds; compare.

    See the package docstring (`keras_adaptive_lora.apps.transfer`) for what
    it does and writes, and `settings.resolve_settings` for the options
    (all keyword-only, all optional): `methods`, `seeds` (or one `seed`),
    `budget` ("same" or "free"), `targets`, `shots`, `epochs`,
    `batch_size`, `rank`, `alpha`, `learning_rate`, `weight_decay`,
    `output_dir`, `preset`, `dataset`, `data_dir`, `image_size`,
    `train_split`, `test_split`, `val_per_class`, `test_size`, `quick`,
    `export`, `plot`, `verbose` (0: only the table and the files, 1: one
    line per method, 2: Keras's line per epoch and per seed), and `log` (a
    function receiving the output lines; default `print`).

    Returns:
        A `TransferResult`.
    """
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    log = kwargs.pop("log", print)
    cfg = resolve_settings(**kwargs)
    at_start = machine()
    os.makedirs(cfg["output_dir"], exist_ok=True)
    methods, seeds, verbose = cfg["methods"], cfg["seeds"], cfg["verbose"]
    status = Status(log, live=None if verbose else False)
    say = log if verbose else (lambda line: None)
    say(
        f"transfer: backend {keras.backend.backend()}, keras {keras.__version__}; "
        f"{len(methods)} methods x {len(seeds)} seeds; output in {cfg['output_dir']}"
    )
    say(cfg["mode_line"])

    # 1. The input size: the offline setting's, or the preset's.
    pretraining, preset = cfg["pretraining"], cfg["preset"]
    if cfg["pretrain"]:
        input_size = (cfg["settings"]["image_size"],) * 2
    else:
        input_size = tuple(int(d) for d in load_backbone(preset).image_shape[:2])
        if cfg["image_size"] is not None and (cfg["image_size"],) * 2 != input_size:
            raise ValueError(
                f"`image_size` {cfg['image_size']} does not match preset {preset!r}, whose ViT "
                f"takes {input_size[0]}x{input_size[1]} images (its position embeddings are "
                "fixed). Leave `image_size` out."
            )

    # 2. The data of each seed (the first one now: a dataset that cannot be
    # read fails before any pre-training).
    data = SeedData(cfg, input_size)
    first = data.get(seeds[0])
    counts = {split: int(sum(c.values())) for split, c in first.splits.counts.items()}
    task = cfg["dataset"] or f"generated target task ({TARGET_DESCRIPTION})"

    # 3. The backbone: pre-trained once in the run (offline), or a preset.
    if cfg["pretrain"]:
        preset = os.path.join(cfg["output_dir"], "pretrained_vit")
        total = cfg["settings"]["pretrain_epochs"]
        pretraining = pretrain_backbone(
            preset, settings=cfg["settings"], setting=cfg["setting"], verbose=verbose,
            callbacks=[EpochStatus(status, "pre-training", total=total)],
            log=status.done if verbose else say,
        )
    backbone = load_backbone(preset)
    base_params = backbone.count_params()
    scale, offset = load_normalization(preset, log=say)
    data.normalize(scale, offset)
    say(
        f"data: {task}, {first.splits.num_classes} classes, {cfg['shots']} shots; per seed "
        f"train {counts['train']}, val {counts['val']}, test {counts['test']} images"
    )

    # 4. Matched budgets.
    adapters = [m for m in methods if is_adapter_method(m)]
    match = None
    if cfg["budget"] == "same" and adapters:
        match = match_budgets(
            backbone, adapters, rank=cfg["rank"], targets=cfg["targets"],
            base={"alpha": cfg["alpha"]},
        )
        for line in match.lines():
            say(line)
    targets = match.targets if match is not None else cfg["targets"]
    del backbone

    # 5. Each method on each seed.
    options = {k: cfg[k] for k in (
        "epochs", "batch_size", "rank", "alpha", "learning_rate", "weight_decay", "verbose")}
    runs, rows, best, timing = {}, [], None, {}
    for index, method in enumerate(methods, 1):
        prefix, method_start = f"[{index}/{len(methods)}] {method}", time.perf_counter()
        runs[method], kept, previous = [], None, None
        for k, seed in enumerate(seeds):
            seed_data = data.get(seed)
            progress = EpochStatus(
                status, f"{prefix}: seed {seed} ({k + 1}/{len(seeds)})",
                total=len(seeds) * cfg["epochs"], done_before=k * cfg["epochs"], started=method_start,
            )
            row, model, logits = adapt(
                method, preset=preset, num_classes=seed_data.splits.num_classes,
                train=seed_data.train, evaluation=seed_data.evaluation,
                steps_per_epoch=seed_data.steps_per_epoch, seed=seed, options=options,
                size=match.options(method) if match is not None else None,
                targets=targets if is_adapter_method(method) else None,
                callbacks=[progress], compiled=previous, log=say,
            )
            runs[method].append(row)
            if kept is None or row["val_accuracy"] > kept[0]["val_accuracy"]:
                kept = (row, model, model.get_weights(), logits, seed_data.evaluation.probe)
            previous = model  # trained again from the next seed's start if it can
            del model
            gc.collect()
        # The best seed's weights back into its model (the model may have
        # trained other seeds since).
        kept[1].set_weights(kept[2])
        kept = (kept[0], kept[1], kept[3], kept[4])
        del previous
        summary = stats.summarize(runs[method])
        rows.append(summary)
        timing[method] = time.perf_counter() - method_start
        key = (summary["val_accuracy"], -summary["trainable_params"])
        if best is None or key > best[0]:
            best = (key, method, *kept)
        del kept
        gc.collect()
        if verbose:
            se = summary["test_accuracy_se"]
            status.done(
                f"{prefix} ({summary['title']}): test {summary['test_accuracy']:.3f}"
                + ("" if se is None else f" ± {se:.3f}")
                + f", val {summary['val_accuracy']:.3f}; {summary['trainable_params']:,} "
                f"trainable params; {clock(timing[method])}"
            )
    top = stats.versus_best(rows, runs)
    _, best_method, best_row, best_model, best_logits, best_probe = best
    comparisons = stats.compare(runs)
    log("")
    log(format_table(rows, best=best_method, exported=cfg["export"]))
    log("")

    # 6. Files.
    config = cfg["record"]
    result = {
        "rows": rows, "runs": runs, "best": best_method, "best_seed": best_row["seed"],
        "best_model": best_model, "config": config, "output_dir": cfg["output_dir"],
        "budget": match.record() if match is not None else None, "comparisons": comparisons,
    }
    if cfg["plot"]:
        result["plot_path"] = save_plot(
            rows, os.path.join(cfg["output_dir"], "transfer.png"), best=best_method,
            exported=cfg["export"],
            title=f"{task}: {cfg['shots']}-shot, {len(seeds)} seed{'s' * (len(seeds) > 1)}, "
                  f"{cfg['epochs']} epochs, budget {cfg['budget']} ({keras.backend.backend()})",
        )
        log(f"plot: {result['plot_path']}")
    if cfg["export"]:
        merged, saved, probe_path, error = export_best(
            best_model, cfg["output_dir"], best_probe, best_logits, log=log,
            note=f"{best_method}, seed {best_row['seed']}",
        )
        result.update(
            merged_path=merged, saved_model_path=saved, probe_path=probe_path, export_error=error
        )
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_started
    at_end = machine()
    record = {
        "config": config,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "machine": dict(at_start, load_average_at_end=at_end["load_average"]),
        "input": {
            "image_size": list(input_size),
            "scale": np.asarray(scale).tolist(),
            "offset": np.asarray(offset).tolist(),
            "note": "the exported model takes images already normalized: x * scale + offset, "
                    "x in [0, 255]",
        },
        "backbone_params": int(base_params),
        "pretraining": pretraining,
        "data": data.record(task),
        "budget": result["budget"] or {"mode": cfg["budget"], "targets": targets},
        "methods": rows,
        "runs": [row for method in methods for row in runs[method]],
        "comparisons": comparisons,
        "best": best_method,
        "best_seed": best_row["seed"],
        "best_test_method": top,
        "files": {
            key: result.get(key)
            for key in ("plot_path", "merged_path", "saved_model_path", "probe_path")
        },
        "export_error": result.get("export_error"),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "timing": {"pretraining": (pretraining or {}).get("seconds") if cfg["pretrain"] else 0.0,
                   "methods": timing},
    }
    result["results_path"] = os.path.join(cfg["output_dir"], "results.json")
    result["seconds"] = seconds
    write_json(result["results_path"], record)
    log(f"results: {result['results_path']}")
    log(
        f"done in {clock(seconds)} ({clock(cpu_seconds)} of CPU time) on {at_start['system']}, "
        f"{at_start['processor']} ({at_start['cpus']} CPUs; load average "
        f"{at_start['load_average'][0]:.2f} at the start, {at_end['load_average'][0]:.2f} at "
        "the end)"
    )
    return TransferResult(**result)
