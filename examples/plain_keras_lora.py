"""LoRA on a plain Keras model: adapt, fit, merge, save.

A small MLP is "pre-trained" on one regression task, then adapted with LoRA
to a shifted task while the base stays frozen; the adapters are merged and the
plain model is saved as a `.keras` file.

    python examples/plain_keras_lora.py            # a few hundred steps
    python examples/plain_keras_lora.py --smoke    # seconds, used by the tests
"""

import argparse
import os
import tempfile

import keras
import numpy as np

import keras_adaptive_lora as kal


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    epochs = 2 if args.smoke else 40

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype("float32")
    w_source = rng.normal(size=(16, 4))
    shift = 0.5 * rng.normal(size=(16, 2)) @ rng.normal(size=(2, 4))  # a rank-2 change
    source = np.tanh(x @ w_source).astype("float32")
    target = np.tanh(x @ (w_source + shift)).astype("float32")

    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(64, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(4, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, source, epochs=epochs, batch_size=64, verbose=0)
    print(f"pre-trained: source mse {model.evaluate(x, source, verbose=0):.4f}, "
          f"target mse {model.evaluate(x, target, verbose=0):.4f}")

    report = kal.apply_adapters(model, kal.LoRA(rank=args.rank), targets="all-linear")
    print(report)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, target, epochs=epochs, batch_size=64, verbose=0)
    adapted = model.evaluate(x, target, verbose=0)
    print(f"adapted: target mse {adapted:.4f}")

    kal.merge_adapters(model)
    with tempfile.TemporaryDirectory(prefix="plain_keras_lora_") as folder:  # removed after
        path = os.path.join(folder, "merged.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        diff = float(np.abs(np.asarray(keras.ops.convert_to_numpy(reloaded(x)))
                            - np.asarray(keras.ops.convert_to_numpy(model(x)))).max())
    print(f"merged, saved and reloaded (a temporary .keras file); reload max |diff| = {diff:.2e}")
    return {"adapted_mse": float(adapted), "reload_diff": diff}


if __name__ == "__main__":
    main()
