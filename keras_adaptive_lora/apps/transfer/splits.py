"""The data of each seed: the few-shot splits a seed samples (a tfds
dataset or the generated target task), normalized, with the evaluation set,
built once per seed and shared by every method."""

import math

from keras_adaptive_lora.apps.transfer.data import (
    Evaluation,
    load_tfds_splits,
    normalized,
    synthetic_splits,
)


class SeedSplits:
    """One seed's data: `splits` (the raw few-shot splits), and once the
    normalization is known, `train` (normalized, unbatched), `evaluation`
    (an `Evaluation`) and `steps_per_epoch`."""

    def __init__(self, splits, batch_size):
        self.splits = splits
        self.num_train = int(sum(splits.counts["train"].values()))
        self.num_val = int(sum(splits.counts["val"].values()))
        self.steps_per_epoch = math.ceil(self.num_train / batch_size)
        self.train = self.evaluation = None

    def normalize(self, scale, offset):
        if self.train is None:
            self.train = normalized(self.splits.train, scale, offset)
            self.evaluation = Evaluation(
                normalized(self.splits.val, scale, offset),
                normalized(self.splits.test, scale, offset),
                self.num_val,
            )


class SeedData:
    """The per-seed data of a run, built on first use and kept.

    Args:
        cfg: the job's settings (`settings.resolve_settings`).
        input_size: `(height, width)` of the backbone's images.
    """

    def __init__(self, cfg, input_size):
        self.cfg, self.input_size = cfg, tuple(input_size)
        self.scale = self.offset = None
        self._by_seed = {}

    def normalize(self, scale, offset):
        """Set the normalization (`x * scale + offset`) of every seed's data."""
        self.scale, self.offset = scale, offset
        for entry in self._by_seed.values():
            entry.normalize(scale, offset)

    def get(self, seed):
        """The `SeedSplits` of `seed`."""
        if seed not in self._by_seed:
            cfg = self.cfg
            if cfg["dataset"] is not None:
                splits = load_tfds_splits(
                    cfg["dataset"], shots=cfg["shots"], seed=seed,
                    val_per_class=cfg["val_per_class"], test_size=cfg["test_size"],
                    image_size=self.input_size, data_dir=cfg["data_dir"],
                    train_split=cfg["train_split"], test_split=cfg["test_split"],
                )
            else:
                splits = synthetic_splits(
                    shots=cfg["shots"], seed=seed, val_per_class=cfg["val_per_class"],
                    test_size=cfg["test_size"], image_size=self.input_size[0],
                )
            self._by_seed[seed] = SeedSplits(splits, cfg["batch_size"])
        entry = self._by_seed[seed]
        if self.scale is not None:
            entry.normalize(self.scale, self.offset)
        return entry

    def record(self, task):
        """What `results.json` says about the data (the first seed's counts;
        every seed samples the same numbers per class)."""
        first = self._by_seed[self.cfg["seeds"][0]].splits
        return {
            "task": task,
            "source": first.source,
            "num_classes": first.num_classes,
            "class_names": list(first.class_names),
            "counts": {split: {str(k): v for k, v in c.items()} for split, c in first.counts.items()},
            "seeds": list(self.cfg["seeds"]),
        }
