"""The Keras DCGAN tutorial itself, in Keras 3, as the speed anchor for the PyTorch pipeline.

This is Erik Linder-Norén's Keras-GAN `dcgan.py` (the model and loop the project reproduces)
with only the changes Keras 3 needs:

* one Adam instance per compiled model (Keras 3 optimizers are built for one set of
  variables and cannot be shared between the discriminator and the combined model);
* `discriminator.trainable` set to True before the discriminator's `train_on_batch` calls
  and to False before the combined model's. In Keras 3 (TensorFlow backend) `trainable` is
  read when a model's train function is traced, i.e. at that model's first
  `train_on_batch`, not at `compile()` as in Keras 2. The tutorial as written (False once,
  before compiling the combined model) therefore leaves the discriminator frozen for good:
  its weights never change and Keras only warns "The model does not have any trainable
  weights". Toggling puts each model's first call, and so its traced function, in the
  right state; `--verify` checks that D changes in its own steps and not in G's.

Everything else is as the tutorial reads: the same layers, binary cross-entropy,
Adam(0.0002, 0.5), `generator.predict` for the fake batch, a fresh `np.random.randint`
batch of real images per iteration and the per-iteration progress print (to /dev/null by
default, so the terminal doesn't time it; `--print-to stdout` shows it).

Measured: images/s = timed iterations x batch size / their wall time, after `--warmup`
untimed iterations, in this process (which imports TensorFlow and never torch). Threads are
TensorFlow's defaults unless `--threads` (intra-op) and `--inter-op-threads` set them.

    python benchmarks/keras_tutorial.py --batch-size 32 --iterations 200 --warmup 20

With `--json` the only line on stdout is the result as one JSON object. With `--serve`
(how benchmarks/train_throughput.py runs it, alternated with its PyTorch arms) it builds,
verifies and warms up, prints a JSON line with "ready", then for each line N read from
stdin runs N timed iterations and prints a JSON line with their images/s; EOF ends it.

Needs `tensorflow-cpu` (or `tensorflow`) and `keras` 3: pip install -e '.[keras]'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PREPARED = Path("data/prepared/mnist.npz")
LATENT_DIM = 100
IMG_SHAPE = (28, 28, 1)
INSTALL = "pip install -e '.[keras]'"

Step = Callable[[int], tuple[np.ndarray, float]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=200, help="timed iterations (not with --serve)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    parser.add_argument("--data", type=Path, default=PREPARED,
                        help="prepared npz with train_images (N, 28, 28) uint8; random images if absent")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: TensorFlow's)")
    parser.add_argument(
        "--inter-op-threads", type=int, default=None, help="inter-op threads (default: TensorFlow's)"
    )
    parser.add_argument("--print-to", choices=("devnull", "stdout", "stderr"), default="devnull",
                        help="where the tutorial's per-iteration progress line goes")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action="store_true",
                        help="first check that D's weights change in its own steps and not in G's")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("--serve", action="store_true", help="time N iterations for each line N on stdin")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.iterations < 1 or args.warmup < 0:
        parser.error("--batch-size and --iterations must be >= 1, --warmup >= 0")
    if any(n is not None and n < 1 for n in (args.threads, args.inter_op_threads)):
        parser.error("--threads and --inter-op-threads must be >= 1")
    if args.serve and args.print_to == "stdout":
        parser.error("--serve answers on stdout: send the progress line to devnull or stderr")
    return args


def load_train_images(path: Path, seed: int) -> tuple[np.ndarray, str]:
    """MNIST's training images scaled as the tutorial does: (N, 28, 28, 1) float32 in [-1, 1]."""
    if path.is_file():
        with np.load(path) as arrays:
            images, source = arrays["train_images"], str(path)
    else:
        images = np.random.default_rng(seed).integers(0, 256, (60000, 28, 28), dtype=np.uint8)
        source = "random"
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise SystemExit(
            f"{path}: train_images must be uint8 (N, 28, 28), got {images.dtype} {images.shape}."
        )
    x_train = images.astype(np.float32) / 127.5 - 1.0
    return np.expand_dims(x_train, axis=3), source


class DCGAN:
    """The tutorial's class, less sampling and saving images."""

    def __init__(self, keras: Any) -> None:
        self.keras = keras
        self.discriminator = self.build_discriminator()
        self.discriminator.compile(loss="binary_crossentropy",
                                   optimizer=keras.optimizers.Adam(0.0002, 0.5),
                                   metrics=["accuracy"])  # fmt: skip
        self.generator = self.build_generator()

        z = keras.Input(shape=(LATENT_DIM,))
        img = self.generator(z)
        self.discriminator.trainable = False
        valid = self.discriminator(img)
        self.combined = keras.Model(z, valid)
        self.combined.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(0.0002, 0.5))

    def build_generator(self) -> Any:
        layers = self.keras.layers
        model = self.keras.Sequential([
            self.keras.Input(shape=(LATENT_DIM,)),
            layers.Dense(128 * 7 * 7, activation="relu"),
            layers.Reshape((7, 7, 128)),
            layers.UpSampling2D(),
            layers.Conv2D(128, kernel_size=3, padding="same"),
            layers.BatchNormalization(momentum=0.8),
            layers.Activation("relu"),
            layers.UpSampling2D(),
            layers.Conv2D(64, kernel_size=3, padding="same"),
            layers.BatchNormalization(momentum=0.8),
            layers.Activation("relu"),
            layers.Conv2D(IMG_SHAPE[2], kernel_size=3, padding="same"),
            layers.Activation("tanh"),
        ])  # fmt: skip
        noise = self.keras.Input(shape=(LATENT_DIM,))
        return self.keras.Model(noise, model(noise))

    def build_discriminator(self) -> Any:
        layers = self.keras.layers
        model = self.keras.Sequential([
            self.keras.Input(shape=IMG_SHAPE),
            layers.Conv2D(32, kernel_size=3, strides=2, padding="same"),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dropout(0.25),
            layers.Conv2D(64, kernel_size=3, strides=2, padding="same"),
            layers.ZeroPadding2D(padding=((0, 1), (0, 1))),
            layers.BatchNormalization(momentum=0.8),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dropout(0.25),
            layers.Conv2D(128, kernel_size=3, strides=2, padding="same"),
            layers.BatchNormalization(momentum=0.8),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dropout(0.25),
            layers.Conv2D(256, kernel_size=3, strides=1, padding="same"),
            layers.BatchNormalization(momentum=0.8),
            layers.LeakyReLU(negative_slope=0.2),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(1, activation="sigmoid"),
        ])  # fmt: skip
        img = self.keras.Input(shape=IMG_SHAPE)
        return self.keras.Model(img, model(img))


def make_step(gan: DCGAN, x_train: np.ndarray, batch_size: int, out: Any) -> Step:
    """One iteration of the tutorial's `train` loop, as a function of the epoch number."""
    valid = np.ones((batch_size, 1))
    fake = np.zeros((batch_size, 1))

    def step(epoch: int) -> tuple[np.ndarray, float]:
        # ---------------------
        #  Train Discriminator
        # ---------------------
        idx = np.random.randint(0, x_train.shape[0], batch_size)
        imgs = x_train[idx]
        noise = np.random.normal(0, 1, (batch_size, LATENT_DIM))
        gen_imgs = gan.generator.predict(noise, verbose=0)

        gan.discriminator.trainable = True  # Keras 3: see the module docstring
        d_loss_real = gan.discriminator.train_on_batch(imgs, valid)
        d_loss_fake = gan.discriminator.train_on_batch(gen_imgs, fake)
        d_loss = 0.5 * np.add(d_loss_real, d_loss_fake)

        # ---------------------
        #  Train Generator
        # ---------------------
        gan.discriminator.trainable = False
        g_loss = gan.combined.train_on_batch(noise, valid)

        # The tutorial's own progress line, % formatting and all.
        print("%d [D loss: %f, acc.: %.2f%%] [G loss: %f]"  # noqa: UP031
              % (epoch, d_loss[0], 100 * d_loss[1], g_loss), file=out)  # fmt: skip
        return d_loss, float(g_loss)

    return step


def verify_trainable(gan: DCGAN, step: Step) -> dict[str, Any]:
    """Run two iterations with D's and G's weights snapshotted around each train_on_batch; fail loudly if wrong."""
    d_model, combined, generator = gan.discriminator, gan.combined, gan.generator

    def snapshot(model: Any) -> list[np.ndarray]:
        return [np.array(w.numpy(), copy=True) for w in model.weights]

    def changed(before: list[np.ndarray], after: list[np.ndarray]) -> int:
        return sum(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))

    record: dict[str, int] = {}
    originals = {"d": d_model.train_on_batch, "c": combined.train_on_batch}

    def wrap(name: str, watch: dict[str, Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            before = {label: snapshot(m) for label, m in watch.items()}
            result = originals[name](*args, **kwargs)
            for label, m in watch.items():
                key = f"{name}_step_changed_{label}"
                record[key] = record.get(key, 0) + changed(before[label], snapshot(m))
            return result

        return call

    d_model.train_on_batch = wrap("d", {"d": d_model})
    combined.train_on_batch = wrap("c", {"d": d_model, "g": generator})
    try:
        for epoch in range(2):
            step(epoch)
    finally:
        del d_model.train_on_batch, combined.train_on_batch  # back to the class's methods
    result = {"d_weights": len(d_model.weights), **record}
    if record.get("d_step_changed_d", 0) == 0:
        raise SystemExit(f"verify: the discriminator's own steps did not change its weights: {result}")
    if record.get("c_step_changed_d", 0) != 0:
        raise SystemExit(f"verify: the combined step changed the discriminator's weights: {result}")
    if record.get("c_step_changed_g", 0) == 0:
        raise SystemExit(f"verify: the combined step did not change the generator's weights: {result}")
    return result


def peak_rss_mib() -> float | None:
    """This process's peak resident set size (Linux VmHWM), None elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


def import_keras(threads: int | None, inter_op_threads: int | None) -> tuple[Any, Any]:
    """TensorFlow (quiet, its thread pools set before the first op) and Keras 3 on its backend."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import keras
        import tensorflow as tf
    except ImportError as exc:
        raise SystemExit(f"The Keras tutorial needs TensorFlow and Keras 3 ({exc}): {INSTALL}.") from None
    if int(keras.__version__.split(".")[0]) < 3:
        raise SystemExit(f"The Keras tutorial needs Keras 3, found {keras.__version__}: {INSTALL}.")
    if threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if inter_op_threads is not None:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    return tf, keras


def run(step: Step, first_epoch: int, iterations: int) -> tuple[float, tuple[np.ndarray, float] | None]:
    """Wall seconds of `iterations` tutorial iterations, and the last one's losses (None for none)."""
    losses = None
    start = time.perf_counter()
    for epoch in range(first_epoch, first_epoch + iterations):
        losses = step(epoch)
    return time.perf_counter() - start, losses


def describe(tf: Any, keras: Any, args: argparse.Namespace, source: str) -> dict[str, Any]:
    """The versions, threads and data a result was measured with."""
    return {
        "batch_size": args.batch_size,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),  # 0: TensorFlow's choice
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cpu_count": os.cpu_count(),
        "devices": [d.device_type for d in tf.config.list_logical_devices()],
        "data": source,
        "print_to": args.print_to,
    }


def reply(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def serve(step: Step, epoch: int, batch_size: int, info: dict[str, Any]) -> None:
    """Answer each line N on stdin with the images/s of N timed iterations; EOF ends."""
    reply({"ready": True, **info, "peak_rss_mib": peak_rss_mib()})
    for line in sys.stdin:
        if not line.strip():
            break
        iterations = int(line)
        seconds, _ = run(step, epoch, iterations)
        epoch += iterations
        reply({"iterations": iterations, "seconds": seconds, "images_per_second": iterations * batch_size / seconds,
               "peak_rss_mib": peak_rss_mib()})  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tf, keras = import_keras(args.threads, args.inter_op_threads)
    keras.utils.set_random_seed(args.seed)  # seeds Python, NumPy's global state and the backend
    x_train, source = load_train_images(args.data, args.seed)
    gan = DCGAN(keras)
    info = describe(tf, keras, args, source)

    with contextlib.ExitStack() as stack:
        out = (
            stack.enter_context(open(os.devnull, "w"))
            if args.print_to == "devnull"
            else getattr(sys, args.print_to)
        )
        step = make_step(gan, x_train, args.batch_size, out)
        epoch = 0
        if args.verify:
            info["verify"] = verify_trainable(gan, step)
            epoch += 2
        run(step, epoch, args.warmup)
        epoch += args.warmup
        if args.serve:
            serve(step, epoch, args.batch_size, info)
            return 0
        seconds, losses = run(step, epoch, args.iterations)
    assert losses is not None  # iterations >= 1
    d_loss, g_loss = losses

    result: dict[str, Any] = {
        **info,
        "iterations": args.iterations,
        "warmup": args.warmup,
        "seconds": seconds,
        "iterations_per_second": args.iterations / seconds,
        "images_per_second": args.iterations * args.batch_size / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "final_d_loss": float(d_loss[0]),
        "final_d_acc": float(d_loss[1]),
        "final_g_loss": g_loss,
    }
    if not args.json:
        print(f"Keras {keras.__version__} / TensorFlow {tf.__version__}, batch {args.batch_size}: "
              f"{result['images_per_second']:.1f} images/s "
              f"({args.iterations} iterations in {seconds:.2f} s after {args.warmup} warm-up)")  # fmt: skip
    reply(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
