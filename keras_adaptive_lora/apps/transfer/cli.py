"""The transfer job's command line: `keras-adaptive-lora transfer` (the
package's command line adds these options as a subcommand) and
`python -m keras_adaptive_lora.apps.transfer`."""

import argparse
import sys

from keras_adaptive_lora.apps.transfer.job import run_transfer
from keras_adaptive_lora.apps.transfer.options import BUDGETS, adapter_titles, all_methods


def add_arguments(parser):
    """Add the transfer job's options to an `argparse` parser."""
    add = parser.add_argument
    add("--methods", default=None,
        help=f"comma-separated subset of {','.join(all_methods())}, or 'all' "
             "(default: every method, plus 'scratch' when the ViT is pre-trained in the run)")
    add("--shots", type=int, default=None,
        help="training examples per class (default: offline 10, --quick 2, real 1)")
    add("--seeds", default=None,
        help="comma-separated seeds; each runs every method (the few-shot sample, the test "
             "examples, the inits and the shuffling follow the seed), and the table gives "
             "mean ± standard error (default: offline 0,1,2; --quick 0,1; real 0,1,2)")
    add("--seed", type=int, default=None, help="a single seed (the same as --seeds N)")
    add("--budget", choices=BUDGETS, default="same",
        help="same: every adapter method on the same layers (--targets) with the same number "
             "of adapter parameters within 5%% (each method's rank or budget chosen to match "
             "the first method's at --rank); free: each method's own targets and defaults "
             "(default: same)")
    add("--targets", default=None,
        help="comma-separated layer names to adapt, e.g. query,value (default: with --budget "
             "same, the layers every method adapts by default, query,value on a ViT; with "
             "--budget free, each method's own)")
    add("--epochs", type=int, default=None,
        help="epochs per method (default: offline 60, --quick 1, real 20)")
    add("--batch-size", type=int, default=None,
        help="training batch size (default 4, the SR-LoRA paper's)")
    add("--rank", type=int, default=8,
        help="--budget free: the rank of every method that takes one (the initial rank of a "
             "method that moves ranks); --budget same: the rank of the first adapter method, "
             "whose parameter count the others match (default 8)")
    add("--alpha", type=float, default=None,
        help="adapter scaling numerator (s = alpha / r) for every adapter method (default: "
             "each method's own)")
    add("--learning-rate", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    add("--weight-decay", type=float, default=5e-2, help="AdamW weight decay (default 5e-2)")
    add("--output-dir", default="transfer_output",
        help="results.json, transfer.png, the preset, the export (default ./transfer_output)")
    add("--preset", default=None,
        help="keras-hub ViT preset name (e.g. vit_base_patch16_224_imagenet21k), local "
             "preset folder, or Hugging Face ViT folder (save_pretrained; needs the hf "
             "extra) (default: pre-train a small ViT in the run, offline)")
    add("--dataset", default=None,
        help="tfds image dataset, e.g. eurosat/rgb (default: the generated target task)")
    add("--data-dir", default=None, help="tfds data directory")
    add("--train-split", default="train", help="tfds split for train/val examples")
    add("--test-split", default="test",
        help="tfds split for test examples; equal to --train-split: the unsampled records")
    add("--val-per-class", type=int, default=None, help="validation examples per class (default: shots)")
    add("--test-size", type=int, default=None,
        help="at most this many test examples (default: offline 600, real: the whole split)")
    add("--image-size", type=int, default=None,
        help="offline: generated image side and ViT input (default 32; --quick 16)")
    add("--quick", "--smoke", dest="quick", action="store_true",
        help="the smallest offline setting: a tiny ViT, 1 epoch per method, seeds 0,1 "
             "(a check that everything runs, not a comparison)")
    add("--no-export", dest="export", action="store_false", help="do not export the best model")
    add("--no-plot", dest="plot", action="store_false", help="do not write transfer.png")
    add("--verbose", type=int, default=1, choices=(0, 1, 2),
        help="0: only the table and the files; 1: also one progress line per method; "
             "2: also Keras's line per epoch, a line per seed and the methods' callbacks' "
             "lines (default 1)")
    return parser


def run(args):
    """Run the job from parsed arguments; returns the exit status (0: done,
    1: the export failed, 2: bad options or unavailable model/data)."""
    options = {
        key: getattr(args, key)
        for key in (
            "methods", "shots", "seeds", "seed", "budget", "targets", "epochs", "batch_size",
            "rank", "alpha", "learning_rate",
            "weight_decay", "output_dir", "preset", "dataset", "data_dir", "image_size",
            "train_split", "test_split", "val_per_class", "test_size", "quick", "export",
            "plot", "verbose",
        )
    }
    try:
        result = run_transfer(**options)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if result.export_error else 0


def description():
    """One line: what the job compares (the baselines and the registered
    adapter methods, by title)."""
    titles = ["linear probing", "full fine-tuning", *adapter_titles()]
    listed = ", ".join(titles[:-1]) + " and " + titles[-1]
    return f"Few-shot transfer of a keras-hub ViT with {listed}; offline by default."


def main(argv=None):
    """`python -m keras_adaptive_lora.apps.transfer [options]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_adaptive_lora.apps.transfer", description=description()
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
