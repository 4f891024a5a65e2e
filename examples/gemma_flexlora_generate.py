"""GemmaCausalLM with FlexLoRA and its scheduler: fit an instruction task, generate.

Loads a keras-hub Gemma causal LM preset, puts FlexLoRA adapters on every
attention and MLP projection, fits them on a small generated instruction task
("Instruction: reverse <words>" -> "Response: <words reversed>") while a
`FlexLoRAScheduler` moves rank between layers by spectral-entropy importance,
prints how the per-layer ranks moved, merges the adapters into plain layers,
checks the merged logits equal the adapted ones and generates a response to a
held-out prompt (a string through the preset's tokenizer). Exits nonzero if a
check fails.

    # real: a keras-hub Gemma preset (needs network for the download; a GPU)
    python examples/gemma_flexlora_generate.py --preset gemma_2b_en --dtype bfloat16
    # smoke: a tiny Gemma with a tiny SentencePiece tokenizer, saved as a local
    # preset (used by the tests)
    python examples/gemma_flexlora_generate.py --smoke

Both modes run the same code (strings in, strings out); the smoke mode only
makes the preset locally: a word-level SentencePiece vocabulary trained on the
task's text and a 1-layer Gemma, written with `save_to_preset` into a
temporary folder. The last line is `SUMMARY {json}` (read by
tests/test_examples.py).
"""

import argparse
import io
import json
import sys
import tempfile

import keras
import keras_hub
import numpy as np

import keras_adaptive_lora as kal

WORDS = ("red", "green", "blue", "black", "white", "cat", "dog", "bird", "fish", "tree")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny local preset with its own tokenizer (seconds)")
    parser.add_argument("--preset", default="gemma_2b_en",
                        help="a keras-hub Gemma preset name or a local preset folder")
    parser.add_argument("--dtype", default=None,
                        help="dtype policy of the loaded model, e.g. bfloat16 (adapter "
                             "variables stay float32)")
    parser.add_argument("--examples", type=int, default=1024, help="training examples")
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8, help="initial FlexLoRA rank per layer")
    parser.add_argument("--b0", type=int, default=4, help="moves at the first reallocation")
    parser.add_argument("--interval", type=int, default=10,
                        help="steps between reallocations")
    parser.add_argument("--max-length", type=int, default=24, help="generate: total tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.sequence_length, args.epochs = 16, 12, 6
        args.rank, args.b0, args.interval, args.learning_rate = 2, 2, 2, 1e-2
    return args


def instruction_task(count, seed):
    """`count` texts "Instruction: reverse w1 w2 w3\\nResponse: w3 w2 w1"."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(count):
        words = list(rng.choice(WORDS, size=3, replace=False))
        texts.append(f"Instruction: reverse {' '.join(words)}\nResponse: "
                     f"{' '.join(reversed(words))}")
    return texts


def make_tiny_preset(directory, texts, sequence_length):
    """A 1-layer Gemma with a word-level SentencePiece tokenizer, saved as a preset."""
    import sentencepiece  # a keras-hub dependency

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=proto,
        vocab_size=32,
        hard_vocab_limit=False,
        model_type="word",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        minloglevel=2,
    )
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto.getvalue())
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(
        directory
    )
    return directory


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    failures = []
    # The smoke preset lives in a temporary folder removed at exit.
    smoke_dir = tempfile.TemporaryDirectory(prefix="tiny_preset_") if args.smoke else None
    texts = instruction_task(args.examples, args.seed)
    prompt = instruction_task(1, args.seed + 1)[0].split("Response:")[0] + "Response:"
    preset = (make_tiny_preset(smoke_dir.name, texts, args.sequence_length)
              if args.smoke else args.preset)
    print(f"backend {keras.backend.backend()}, preset {preset}")

    load_kwargs = {"dtype": args.dtype} if args.dtype else {}
    lm = keras_hub.models.GemmaCausalLM.from_preset(preset, **load_kwargs)
    lm.preprocessor.sequence_length = args.sequence_length
    report = kal.apply_adapters(lm, kal.FlexLoRA(rank=args.rank, seed=args.seed))
    print(report)

    steps = args.epochs * int(np.ceil(len(texts) / args.batch_size))
    scheduler = kal.FlexLoRAScheduler(
        total_steps=steps,
        b0=args.b0,
        warmup_steps=max(1, steps // 10),
        final_steps=max(1, steps // 5),
        interval=args.interval,
        verbose=1,
    )
    lm.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
        sampler="greedy",
    )
    history = lm.fit(x=texts, batch_size=args.batch_size, epochs=args.epochs,
                     callbacks=[scheduler], verbose=2 if args.smoke else 1)
    losses = history.history["loss"]
    print(f"fit {steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    ranks = scheduler.rank_history()
    print("rank pattern over time (rows: steps; columns: layers in report order)")
    for step, row in zip(ranks["steps"], ranks["ranks"]):
        print(f"  step {int(step):5d}: {' '.join(str(int(r)) for r in row)}  "
              f"(total {int(row.sum())})")
    pattern = scheduler.rank_pattern
    moved = {path: rank for path, rank in pattern.items() if rank != args.rank}
    print(f"layers whose rank moved from {args.rank}: {moved}")
    totals = ranks["ranks"].sum(axis=1)
    if not moved:
        failures.append("no layer's rank moved")
    if not np.all(totals == totals[0]):
        failures.append(f"total active rank changed: {totals.tolist()}")
    if not np.all(np.isfinite(losses)):
        failures.append(f"non-finite training loss: {losses}")

    batch = lm.preprocessor(texts[: args.batch_size])[0]
    adapted_logits = to_numpy(lm(batch))
    merged = kal.merge_adapters(lm)
    merged_logits = to_numpy(lm(batch))
    diff = float(np.abs(merged_logits - adapted_logits).max())
    scale = max(1.0, float(np.abs(adapted_logits).max()))
    tolerance = (1e-4 if args.dtype in (None, "float32") else 5e-2) * scale
    print(f"merged {merged} adapters: max |logit difference| {diff:.2e} "
          f"(tolerance {tolerance:.1e})")
    if not diff <= tolerance:
        failures.append(f"merged logits differ by {diff:.2e} > {tolerance:.1e}")

    generated = lm.generate(prompt, max_length=args.max_length)
    print(f"prompt: {prompt!r}\ngenerated (merged model): {generated!r}")
    if not isinstance(generated, str) or not generated.startswith(prompt.split()[0]):
        failures.append(f"generate returned {generated!r}")

    summary = {
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "steps": steps,
        "moves": int(sum(history.history["flexlora/moves"])),
        "rank_pattern": pattern,
        "total_rank": [int(t) for t in totals],
        "merged": merged,
        "merge_diff": diff,
        "generated": generated,
        "failures": failures,
    }
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
