"""Train a small neighborhood-attention vision transformer on scikit-learn's digits.

The 8x8 digit images (bundled with scikit-learn, no download) become an 8x8 grid of pixel
tokens; each block runs 2-D neighborhood attention (`jax_gna.flax.NeighborhoodAttention`)
and an MLP. Gradients flow through the GNA implementation's custom VJP: with
``--implementation`` unset, the best one here (the CUDA custom call on a GPU, the portable
`xla` path on CPU); ``--implementation cpu`` trains through the native CPU custom call.
Reaches >= 95 % test accuracy in about a minute on two CPU cores.

Run:  python examples/train_digits.py            (add --check to fail below 95 %)
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jax_gna
from jax_gna.flax import NeighborhoodAttention


class Block(nnx.Module):
    """Pre-norm transformer block: neighborhood attention, then an MLP."""

    def __init__(self, dim: int, heads: int, window: int, implementation: str | None,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = NeighborhoodAttention(dim, heads, window, implementation=implementation,
                                          rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


def pixel_neighbourhoods(images: jax.Array) -> jax.Array:
    """``[B, 8, 8]`` -> ``[B, 8, 8, 9]``: each pixel token carries its 3x3 surroundings."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    return jnp.stack([padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)], -1)


class NAViT(nnx.Module):
    """Images ``[B, 8, 8]`` -> class logits ``[B, 10]`` through an 8x8 grid of tokens."""

    def __init__(self, dim: int, heads: int, depth: int, window: int,
                 implementation: str | None, rngs: nnx.Rngs):
        self.embed = nnx.Linear(9, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (8, 8, dim)))
        self.blocks = nnx.List([Block(dim, heads, window, implementation, rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        x = self.embed(pixel_neighbourhoods(images)) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=(1, 2)))


def load_data(seed: int):
    """Standardised 8x8 images and labels, stratified 80/20 train/test split."""
    digits = load_digits()
    images = (digits.images / 16.0 - 0.5) / 0.5
    return train_test_split(images.astype(np.float32), digits.target.astype(np.int32),
                            test_size=0.2, random_state=seed, stratify=digits.target)


def shift_augment(images: jax.Array, key: jax.Array) -> jax.Array:
    """Random translations by up to one pixel (zero fill): the digits sit loosely centred."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1]), (8, 8))  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def train(args) -> dict:
    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = NAViT(args.dim, args.heads, args.depth, args.window, args.implementation,
                  nnx.Rngs(args.seed))
    steps_per_epoch = len(x_train) // args.batch
    total = args.epochs * steps_per_epoch if args.steps is None else args.steps
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, total // 10), total)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, labels, key):
        images = shift_augment(images, key)

        def loss_fn(model):
            logits = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)   # through the GNA custom VJP
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, images):
        return jnp.argmax(model(images), axis=-1)

    def accuracy(x, y):
        preds = np.concatenate([predict(model, x[i:i + 256]) for i in range(0, len(x), 256)])
        return float(np.mean(preds == y))

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed)
    start = time.perf_counter()
    step = 0
    while step < total:
        order = rng.permutation(len(x_train))
        for i in range(steps_per_epoch):
            if step == total:
                break
            idx = order[i * args.batch:(i + 1) * args.batch]
            key, sub = jax.random.split(key)
            loss = train_step(model, optimizer, x_train[idx], y_train[idx], sub)
            step += 1
            if step % args.log_every == 0 or step == total:
                print(f"step {step:5d}/{total}  loss {float(loss):.4f}  "
                      f"({time.perf_counter() - start:.1f}s)", flush=True)
    train_time = time.perf_counter() - start
    result = {"test_accuracy": accuracy(x_test, y_test),
              "train_accuracy": accuracy(x_train, y_train),
              "steps": total, "train_seconds": train_time}
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--implementation", default=None,
                   help="jax_gna implementation (default: best available: "
                        f"{jax_gna.available_implementations()[0]})")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--window", type=int, default=5, help="neighbourhood per axis (8x8 grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--check", action="store_true", help="exit 1 if test accuracy < --target")
    p.add_argument("--target", type=float, default=0.95)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    impl = args.implementation or jax_gna.available_implementations()[0]
    print(f"jax {jax.__version__} on {jax.default_backend()}; GNA implementation: {impl}; "
          f"8x8 pixel tokens, window {args.window}x{args.window}, dim {args.dim}, "
          f"{args.heads} heads, depth {args.depth}")
    result = train(args)
    print(f"test accuracy {result['test_accuracy']:.4f}  (train "
          f"{result['train_accuracy']:.4f}) after {result['steps']} steps in "
          f"{result['train_seconds']:.1f}s")
    if args.check and result["test_accuracy"] < args.target:
        print(f"FAILED: test accuracy {result['test_accuracy']:.4f} < {args.target}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
