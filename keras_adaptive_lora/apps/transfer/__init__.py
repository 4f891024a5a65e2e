"""The main job: few-shot transfer of a keras-hub ViT with every method.

`keras-adaptive-lora transfer` (or `python -m keras_adaptive_lora.apps.transfer`,
or `run_transfer(...)` from Python) adapts one pretrained ViT backbone to a
few-shot image classification task with each method: `linear` (probe: frozen
backbone, trained head), `full` (full fine-tune), and every adapter method in
the method registry (`keras_adaptive_lora.core.method`; today `lora`,
`sr-lora`, `flexlora`, trained with the rank scheduler its spec's
`callbacks` returns, and `sinc`, LR-LoRA), plus the optional reference `scratch` (full training of
the same architecture from a random init). Every method starts from the same
backbone weights and the same head init (a new `Dense` on the class token of a
`keras_hub.models.ViTImageClassifier`; the head is trained by every method).

It runs every method on each seed (`seeds`, default 0, 1, 2: a seed draws
the few-shot sample and the test examples and sets the inits and the
shuffling) and, with `budget="same"` (the default), gives every adapter
method the same target layers and the same number of adapter parameters
within 5% (`budget.py`; `budget="free"`: each method's own defaults). It
prints one line per method (updated in place on a terminal; `verbose=2`
adds Keras's line per epoch and a line per seed), then a table (mean test
accuracy ± standard error over the seeds, the paired difference from the
best method marked beyond two standard errors, validation accuracy,
trainable parameters, ms per training step), and writes to `output_dir`:

- `results.json`: the configuration, the matched budgets, the data, every
  per-seed row (`runs`), one summary per method (`methods`), the paired
  comparisons of every pair of methods, the best method and seed, the
  files, the machine, and the wall and CPU time;
- `transfer.png`: accuracy vs trainable parameters (log x; mean ± standard
  error, the exported method marked) per method, and heatmaps of the
  per-layer rank allocation of each method whose ranks differ across layers
  (`per_layer_ranks`), titled with the initial ranks and the capacity;
- the method with the best mean validation accuracy (ties: fewer trainable
  parameters), from its best seed, adapters merged: `best_merged.keras`
  (`save_merged`) and a TensorFlow SavedModel `best_saved_model/`
  (`export_merged` under the tensorflow backend; under torch or jax,
  `keras-adaptive-lora export` in a `KERAS_BACKEND=tensorflow` subprocess),
  plus `export_probe.npz` (a few test inputs and the adapted model's logits,
  to check the export against). The exported model takes images already
  normalized as in `results.json` (`input.scale`, `input.offset`).

Two ways to get the backbone and the data, one code path after that:

- Offline (default, no network): a small `ViTBackbone` is pre-trained once
  per run on a generated source task (`synthetic`, in this package), saved
  with `save_to_preset` into the output directory with a `ViTImageConverter`
  (and the settings it used, so that `preset=` that folder later keeps
  them: `settings.py`), and loaded back with `from_preset`; the target task
  is generated with a domain gap (`synthetic.target_task`) and sampled with
  `data.from_arrays`.
- Real: `--preset` (a keras-hub ViT preset name such as
  `vit_base_patch16_224_imagenet21k`, or a local preset folder) and/or
  `--dataset` (a tfds image dataset, sampled VTAB-1k style by
  `data.few_shot_splits`). Images are normalized with the preset's image
  converter (`scale`, `offset`; keras-hub's ViT presets map `[0, 255]` to
  `[-1, 1]`).

Training (SR-LoRA paper, section 4), the same for every method: AdamW,
learning rate 1e-3, weight decay 5e-2, cosine decay to 0 after a 10% linear
warmup, batch size 4, 20 epochs (offline: 60, see `options.OFFLINE`); each
method's own scaling (see `train.method_spec`) and, with `budget="free"`,
its own default targets. The
offline pre-training uses AdamW with learning rate 4e-3 and batch size 64
(`options.OFFLINE`).

Each method keeps its weights after the last epoch (no per-epoch
checkpoint selection); the validation split only picks the exported method.

The package, by stage: `options` (constants, option checks, the methods),
`settings` (the mode and its defaults), `synthetic` (the generated tasks),
`data` and `splits` (splits per seed, normalization, evaluation set),
`backbone` (pre-training, loading, normalization, the learning-rate
schedule), `budget` (matched budgets), `train` (one method on one seed),
`stats` (means, standard errors, paired comparisons), `report`
(`TransferResult`, table), `plot`, `progress` (the output lines), `export`
(the best method), `job` (`run_transfer`), `cli`.
"""

from keras_adaptive_lora.apps.transfer.cli import add_arguments, main, run
from keras_adaptive_lora.apps.transfer.job import run_transfer
from keras_adaptive_lora.apps.transfer.report import TransferResult

__all__ = ["TransferResult", "add_arguments", "main", "run", "run_transfer"]
