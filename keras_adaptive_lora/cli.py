"""Command line: `keras-adaptive-lora transfer` (the main job: few-shot ViT
transfer comparing the methods; see `keras_adaptive_lora.apps.transfer`),
`keras-adaptive-lora smoke` (a LoRA check on a tiny Gemma: fit, merge, compare),
`keras-adaptive-lora export MODEL.keras OUT_DIR` (a TensorFlow SavedModel of a
`.keras` file, e.g. one written by `save_merged`; tensorflow or jax in
process, torch through a tensorflow subprocess), `keras-adaptive-lora inspect
SOURCE` (per target layer of a keras-hub preset folder, Hugging Face
transformers folder, preset name or `.keras` file: kernel shape, matrix view,
stable rank and a method's rank plan; see `keras_adaptive_lora.inspection`)
and `export-peft` / `import-peft` (adapter files to and from PEFT LoRA
adapters; see `keras_adaptive_lora.saving.peft`).

`smoke` builds a tiny keras-hub Gemma causal LM from config (no download),
puts LoRA on its query and value projections, fits a few steps on a
synthetic next-token task, merges the adapters and checks that the merged
plain model gives the same logits. (`make demo` is the main job,
`transfer`.)

`keras-adaptive-lora --help` imports no backend: a subcommand's options
that need the method registry or the transfer job are added only when that
subcommand is on the command line. TensorFlow's native log lines (CUDA
probes on machines without a GPU) are silenced: `TF_CPP_MIN_LOG_LEVEL`
defaults to 3 here, and what native libraries print while loading is
dropped (shown if the import fails). Under torch or jax, the command
`keras-adaptive-lora inspect` loads keras-hub without TensorFlow (keras-hub imports it whenever it is
installed; inspecting a model does not use it). The commands that train
(`smoke`, `transfer`) need it: keras-hub feeds `fit` through tf.data.
"""

import argparse
import contextlib
import os
import sys
import tempfile
import time

# Subcommands whose work (or options) needs keras and keras-hub.
_NEEDS_KERAS = ("smoke", "export", "inspect", "transfer", "export-peft", "import-peft")
# Of those, the ones that do not need TensorFlow unless it is the backend
# (keras-hub's task `fit` does: `smoke` and `transfer` train).
_WITHOUT_TF = ("inspect",)


@contextlib.contextmanager
def _native_stderr_dropped():
    """Drop what native code writes to the stderr file descriptor inside the
    block (e.g. TensorFlow's CUDA probe lines while it loads); replay it
    when the block raises."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):  # a captured stream
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        except BaseException:
            os.dup2(saved, fd)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def _load_keras(command, whole_process):
    """Import keras and keras-hub for `command`, quietly; without TensorFlow
    when neither the backend nor the command needs it and the command is
    the whole process (`keras-adaptive-lora ...`: keras-hub then stays
    without it, which a later training in the same process would need)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with _native_stderr_dropped():
        import keras

        block = (
            whole_process
            and command in _WITHOUT_TF
            and keras.backend.backend() != "tensorflow"
            and "keras_hub" not in sys.modules
            and "tensorflow" not in sys.modules
        )
        if block:  # keras-hub sees it as not installed, for the whole command
            sys.modules["tensorflow"] = None
        import keras_hub  # noqa: F401


def _smoke(args):
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

    def fail(message):
        print(f"keras-adaptive-lora export: error: {message}", file=sys.stderr)
        return 2

    if not os.path.isfile(args.model):
        return fail(f"{args.model!r} is not a file; pass a .keras file (e.g. one written "
                    "by keras_adaptive_lora.save_merged).")
    try:
        model = keras.saving.load_model(args.model, compile=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        return fail(f"cannot load {args.model!r} as a Keras model ({type(error).__name__}: "
                    f"{error}); pass a .keras file written by model.save or save_merged.")
    try:
        kal.export_merged(model, args.out_dir, overwrite=args.overwrite)
    except ValueError as error:
        return fail(str(error).replace("`overwrite=True` (command line: `--overwrite`)",
                                       "--overwrite"))
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
    except (ValueError, ImportError) as error:
        print(f"keras-adaptive-lora inspect: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _export_peft(args):
    import keras_adaptive_lora as kal
    from keras_adaptive_lora import inspection

    try:
        model = inspection.load_model(args.base)
        kal.load_adapters(model, args.adapters)
        summary = kal.save_peft_adapters(
            model, args.out_dir, svd_rank=args.svd_rank, module_prefix=args.module_prefix,
            base_model_name_or_path=args.base_model_name_or_path or args.base,
        )
    except (ValueError, ImportError) as error:
        print(f"keras-adaptive-lora export-peft: error: {error}", file=sys.stderr)
        return 2
    layers = summary["layers"]
    print(f"wrote PEFT LoRA adapter {args.out_dir}: {len(layers)} modules, r={summary['r']} "
          f"(lora_alpha=r; per-module ranks {sorted({x['rank'] for x in layers})})")
    for layer in layers:
        if layer["relative_error"]:
            print(f"  {layer['module']}: rank-{layer['rank']} SVD truncation, relative "
                  f"error {layer['relative_error']:.3g}")
    return 0


def _import_peft(args):
    import keras_adaptive_lora as kal
    from keras_adaptive_lora import inspection

    try:
        model = inspection.load_model(args.base)
        report = kal.load_peft_adapters(model, args.peft_dir)
        kal.save_adapters(model, args.out)
    except (ValueError, ImportError) as error:
        print(f"keras-adaptive-lora import-peft: error: {error}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out}; re-apply with keras_adaptive_lora.load_adapters(model, "
          f"{args.out!r}) on the base {args.base!r}")
    return 0


def _add_peft_commands(sub):
    formatter = argparse.RawDescriptionHelpFormatter
    export = sub.add_parser(
        "export-peft", formatter_class=formatter,
        help="write adapters (a save_adapters file) as a PEFT LoRA adapter for PEFT and vLLM",
        description="Load BASE (a Hugging Face transformers folder, a keras-hub preset "
        "folder or name), put the adapters of ADAPTERS on it (load_adapters) and write "
        "OUT_DIR with adapter_config.json and adapter_model.safetensors "
        "(save_peft_adapters): Llama, Gemma and ViT; LoRA, SR-LoRA and FlexLoRA exactly, "
        "LR-LoRA only with --svd-rank.",
        epilog="example:\n"
        "  keras-adaptive-lora export-peft adapters.npz ./llama_hf ./peft_adapter\n"
        "  vllm serve ./llama_hf --enable-lora --max-lora-rank 64 \\\n"
        "      --lora-modules mine=./peft_adapter",
    )
    export.add_argument("adapters", help="an adapter file written by save_adapters")
    export.add_argument("base", help="the base model the adapters were trained on")
    export.add_argument("out_dir", help="the PEFT adapter folder to write (new or empty)")
    export.add_argument(
        "--svd-rank", type=int, default=None,
        help="write updates that are not low-rank (LR-LoRA) as their best rank-k SVD "
        "truncation, reporting the relative error (default: refuse them)",
    )
    export.add_argument(
        "--module-prefix", default=None,
        help="transformers module prefix (default: model. for Llama and Gemma, vit. for ViT; "
        "e.g. model.language_model. for Gemma3ForConditionalGeneration)",
    )
    export.add_argument(
        "--base-model-name-or-path", default=None,
        help="recorded in adapter_config.json (default: BASE)",
    )
    export.set_defaults(func=_export_peft)
    imp = sub.add_parser(
        "import-peft", formatter_class=formatter,
        help="turn a PEFT LoRA adapter into an adapter file (load_peft_adapters + save_adapters)",
        description="Load BASE (the Hugging Face transformers folder the PEFT adapter was "
        "trained on, or its keras-hub preset), put the PEFT LoRA adapter of PEFT_DIR on it "
        "as LoRA adapters (load_peft_adapters: per-module ranks, rsLoRA, rank_pattern and "
        "alpha_pattern) and write them to OUT with save_adapters, to train on, merge or "
        "export in Keras.",
        epilog="example:\n"
        "  keras-adaptive-lora import-peft ./peft_adapter ./llama_hf adapters.npz",
    )
    imp.add_argument("peft_dir", help="a PEFT adapter folder (adapter_config.json, "
                     "adapter_model.safetensors)")
    imp.add_argument("base", help="the base model the PEFT adapter was trained on")
    imp.add_argument("out", help="the adapter file to write (.npz)")
    imp.set_defaults(func=_import_peft)


def build_parser(command="all"):
    """The command line's parser. `command`: the subcommand whose options
    that need the method registry or the transfer job (`inspect`,
    `transfer`) are added (`"all"`: every one; None: none, for the top-level
    `--help`, which then imports no backend)."""
    parser = argparse.ArgumentParser(
        prog="keras-adaptive-lora",
        description="Adaptive-rank LoRA for Keras 3 and keras-hub. Run "
        "`keras-adaptive-lora COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    transfer = sub.add_parser(
        "transfer",
        help="the main job: few-shot ViT transfer comparing the methods over several seeds "
        "at matched budgets (offline by default; `make demo`)",
    )
    smoke = sub.add_parser(
        "smoke", help="a quick check on a tiny Gemma: LoRA, fit, merge, compare the logits"
    )
    smoke.add_argument("--rank", type=int, default=4)
    smoke.add_argument("--epochs", type=int, default=5)
    smoke.add_argument("--learning-rate", type=float, default=1e-2)
    smoke.add_argument("--seed", type=int, default=0)
    smoke.set_defaults(func=_smoke)
    export = sub.add_parser(
        "export",
        help="write a TensorFlow SavedModel of a .keras file (tensorflow or jax in process; "
        "torch through a tensorflow subprocess)",
    )
    export.add_argument("model", help="a .keras file, e.g. from keras_adaptive_lora.save_merged")
    export.add_argument("out_dir", help="the SavedModel directory to write (new or empty)")
    export.add_argument(
        "--overwrite", action="store_true", help="replace a SavedModel already in out_dir"
    )
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
        help="a keras-hub preset folder (Backbone.save_to_preset), a Hugging Face "
        "transformers folder (save_pretrained; the hf extra), a .keras file, or a "
        "keras-hub preset name (downloads)",
    )
    if command in ("all", "inspect"):
        _add_inspect_options(inspect)
    inspect.set_defaults(func=_inspect)
    _add_peft_commands(sub)
    if command in ("all", "transfer"):
        from keras_adaptive_lora.apps import transfer as transfer_job

        transfer.description = transfer_job.__doc__.strip().splitlines()[0]
        transfer_job.add_arguments(transfer)
        transfer.set_defaults(func=transfer_job.run)
    return parser


def _add_inspect_options(inspect):
    from keras_adaptive_lora.core.method import get_method, method_names
    from keras_adaptive_lora import methods  # noqa: F401  (registers the built-in methods)

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


def main(argv=None):
    whole_process = argv is None  # the console script, or `python -m`
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in _NEEDS_KERAS:  # the top-level help, or an unknown command
        command = None
    else:
        _load_keras(command, whole_process)
    args = build_parser(command).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
