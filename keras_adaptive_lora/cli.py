"""Command line: `keras-adaptive-lora transfer` (the main job: few-shot ViT
transfer comparing the methods; see `keras_adaptive_lora.apps.transfer`),
`keras-adaptive-lora demo` (a one-minute LoRA smoke run on a tiny Gemma),
`keras-adaptive-lora export MODEL.keras OUT_DIR` (a TensorFlow SavedModel of a
`.keras` file, e.g. one written by `save_merged` under torch or jax; run it
with `KERAS_BACKEND=tensorflow`) and `keras-adaptive-lora inspect SOURCE`
(per target layer of a keras-hub preset folder, preset name or `.keras` file:
kernel shape, matrix view, stable rank and a method's rank plan; see
`keras_adaptive_lora.inspection`).

The demo builds a tiny keras-hub Gemma causal LM from config (no download),
puts LoRA on its query and value projections, fits a few steps on a
synthetic next-token task, merges the adapters and checks that the merged
plain model gives the same logits.
"""

import argparse
import sys
import time


def _demo(args):
    import keras
    import keras_hub
    import numpy as np

    import keras_adaptive_lora as kal

    keras.utils.set_random_seed(args.seed)
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
          f"keras_adaptive_lora {kal.__version__}")
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=64,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=8,
    )
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)

    # Synthetic task: the next token is the current one plus one (mod vocab).
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, 64, (64, 1))
    tokens = (starts + np.arange(17)) % 64
    x = {"token_ids": tokens[:, :-1].astype("int32"), "padding_mask": np.ones((64, 16), "int32")}
    y = tokens[:, 1:]

    report = kal.apply_adapters(lm, kal.LoRA(rank=args.rank, alpha=2.0 * args.rank))
    print(report)
    lm.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = lm.fit(x, y, batch_size=16, epochs=args.epochs, verbose=0)
    seconds = time.perf_counter() - start
    losses = history.history["loss"]
    print(f"fit {args.epochs} epochs ({args.epochs * 4} steps) in {seconds:.1f}s: "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    adapted = np.asarray(keras.ops.convert_to_numpy(lm.predict(x, verbose=0)))
    merged = kal.merge_adapters(lm)
    plain = np.asarray(keras.ops.convert_to_numpy(lm.predict(x, verbose=0)))
    diff = float(np.abs(plain - adapted).max())
    print(f"merged {merged} adapters into plain layers; max |logits difference| = {diff:.2e}")
    if diff > 1e-3:
        print("merge check FAILED", file=sys.stderr)
        return 1
    return 0


def _export(args):
    import keras
    import keras_hub  # noqa: F401  (registers keras-hub classes for loading)

    import keras_adaptive_lora as kal

    if keras.backend.backend() != "tensorflow":
        print(
            f"export needs KERAS_BACKEND=tensorflow (this process runs "
            f"{keras.backend.backend()!r}); run: KERAS_BACKEND=tensorflow python -m "
            f"keras_adaptive_lora.cli export {args.model} {args.out_dir}",
            file=sys.stderr,
        )
        return 2
    model = keras.saving.load_model(args.model, compile=False)
    kal.export_merged(model, args.out_dir)
    print(f"wrote TensorFlow SavedModel {args.out_dir} (endpoint 'serve') from {args.model}")
    return 0


def _inspect(args):
    from keras_adaptive_lora import inspection

    def progress(done, total, path):
        print(f"[{done}/{total}] stable rank of {path}", file=sys.stderr, flush=True)

    try:
        if not args.quiet:
            print(f"loading {args.source} ...", file=sys.stderr, flush=True)
        report = inspection.inspect_source(
            args.source,
            args.method,
            rank=args.rank,
            budget=args.budget,
            max_rank=args.max_rank,
            targets="all-linear" if args.targets == ["all-linear"] else args.targets,
            progress=None if args.quiet else progress,
        )
    except ValueError as error:
        print(f"keras-adaptive-lora inspect: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def build_parser():
    from keras_adaptive_lora.core.method import get_method, method_names
    from keras_adaptive_lora import methods  # noqa: F401  (registers the built-in methods)

    parser = argparse.ArgumentParser(
        prog="keras-adaptive-lora",
        description="Adaptive-rank LoRA for Keras 3 and keras-hub.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="wrap a tiny Gemma with LoRA, fit, merge, check")
    demo.add_argument("--rank", type=int, default=4)
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--learning-rate", type=float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    export = sub.add_parser(
        "export",
        help="write a TensorFlow SavedModel of a .keras file (KERAS_BACKEND=tensorflow)",
    )
    export.add_argument("model", help="a .keras file, e.g. from keras_adaptive_lora.save_merged")
    export.add_argument("out_dir", help="the SavedModel directory to write")
    export.set_defaults(func=_export)
    inspect = sub.add_parser(
        "inspect",
        help="per-layer kernel shapes, stable ranks and a method's rank plan",
        description="Load a keras-hub backbone (a preset folder works offline) or a "
        ".keras model, match the method's target layers as apply_adapters would, and "
        "print per layer: path, kernel shape, (d_in x d_out) matrix view, stable rank, "
        "the rank the method allocates and its adapter parameters, with totals.",
    )
    inspect.add_argument(
        "source",
        help="a keras-hub preset folder (Backbone.save_to_preset), a .keras file, or a "
        "keras-hub preset name (downloads)",
    )
    names = method_names()

    def having(option):
        return ", ".join(n for n in names if option in get_method(n).option_names())

    inspect.add_argument(
        "--method", default=names[0], choices=list(names),
        help=f"the method whose targets and ranks to show (default: {names[0]})",
    )
    inspect.add_argument(
        "--rank", type=int, default=None,
        help=f"the (initial) rank, for {having('rank')} (default: the method's own)",
    )
    inspect.add_argument(
        "--budget", type=int, default=None,
        help=f"total adapter-parameter budget (ranks scaled down to fit), for {having('budget')}",
    )
    inspect.add_argument(
        "--max-rank", type=int, default=None,
        help=f"per-layer rank cap or capacity, for {having('max_rank')}",
    )
    inspect.add_argument(
        "--targets", nargs="+", default=None,
        help="layer names or path regexes, or all-linear (default: the method's targets)",
    )
    inspect.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    inspect.set_defaults(func=_inspect)
    from keras_adaptive_lora.apps import transfer as transfer_job

    transfer = sub.add_parser(
        "transfer",
        help="the main job: few-shot ViT transfer comparing the methods (offline by default)",
        description=transfer_job.__doc__.strip().splitlines()[0],
    )
    transfer_job.add_arguments(transfer)
    transfer.set_defaults(func=transfer_job.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
