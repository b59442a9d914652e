"""Counter-based randomness for batched augmentation and masking, independent of world size.

Every random number of a training step is a function of ``(seed, step, stream, global view
index)`` only - not of the device, the number of processes or which process holds a view:

- per-view parameters (crop boxes, rectangles, corruption kinds, ...) are drawn for the whole
  *global* batch from a ``torch.Generator`` seeded by ``(seed, step, stream)`` on the CPU and
  sliced to this process's views (they are a few numbers per view, so drawing them for the
  global batch costs nothing next to the step);
- per-pixel noise is a hash of ``(seed, step, stream, global view, pixel)``, computed only for
  this process's views with integer tensor operations on the training device.

So a run on 2 GPUs with 128 images each sees exactly the augmentations and masks of a run on
one GPU with 256, a resumed run redraws exactly what the interrupted one would have, and the
CPU and CUDA paths produce the same numbers. (The GMML reference draws masks in loader workers
with unseeded NumPy/Python RNGs, so it is reproducible in none of these senses.)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def hash32(x: Tensor) -> Tensor:
    """The 'lowbias32' integer hash (C. Wellons), elementwise on an int32 tensor.

    Multiplication wraps modulo 2**32 (two's complement, on CPU and CUDA alike); the masks
    after each right shift turn torch's arithmetic shift into the logical shift of the
    unsigned original.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -0x7B935975  # 0x846CA68B as a signed 32-bit value
    return x ^ ((x >> 16) & 0xFFFF)


def _unit(words: Tensor) -> Tensor:
    """int32 hash words -> float32 uniforms in (0, 1) from their low 23 bits."""
    return ((words & 0x7FFFFF).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


@dataclass(frozen=True)
class BatchRandom:
    """Random draws of one training step for this process's views of a global batch.

    Attributes:
        seed: the run seed.
        step: the step (optimisation step; micro-step index when accumulating gradients).
        total: number of views in the global batch (all processes).
        index: int64 [count] (CPU) global view index of each local view, in local order.
        device: the training device (results are moved there).
    """

    seed: int
    step: int
    total: int
    index: Tensor
    device: torch.device

    @staticmethod
    def local(seed: int, step: int, count: int, device: torch.device | str = "cpu") -> BatchRandom:
        """A batch of ``count`` views held entirely by this process."""
        return BatchRandom(seed, step, count, torch.arange(count), torch.device(device))

    @staticmethod
    def for_views(
        seed: int,
        step: int,
        *,
        n_views: int,
        global_batch: int,
        first_image: int,
        local_batch: int,
        device: torch.device | str = "cpu",
    ) -> BatchRandom:
        """Views laid out view-major (view ``v`` of local image ``i`` at ``v * B_local + i``).

        The global id of that view is ``v * global_batch + first_image + i``, the position it
        has when one process holds the whole global batch.
        """
        v = torch.arange(n_views)[:, None]
        i = torch.arange(local_batch)[None, :]
        index = (v * global_batch + first_image + i).reshape(-1)
        return BatchRandom(seed, step, n_views * global_batch, index, torch.device(device))

    @property
    def count(self) -> int:
        return int(self.index.numel())

    def generator(self, stream: str) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, self.step, stream))

    def rand(self, stream: str, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """U[0, 1) of shape [count, *shape]: drawn for all global views, this process's rows."""
        values = torch.rand((self.total, *shape), generator=self.generator(stream), dtype=dtype)
        if self.count != self.total or not torch.equal(self.index, torch.arange(self.total)):
            values = values.index_select(0, self.index)
        return values.to(self.device, non_blocking=True)

    def randint(self, stream: str, low: int, high: int, *shape: int) -> Tensor:
        """Integers uniform in [low, high), shape [count, *shape]."""
        u = self.rand(stream, *shape, dtype=torch.float64)
        return (low + torch.floor(u * (high - low))).long().clamp_max(high - 1)

    def _key(self, stream: str) -> int:
        return derive_seed(self.seed, self.step, stream) & 0x7FFFFFFF

    def _view_words(self, stream: str) -> Tensor:
        """One hashed int32 word per local view, from its global index and the stream key."""
        ids = self.index.to(device=self.device, dtype=torch.int32)
        return hash32(ids ^ self._key(stream))

    def normal(self, stream: str, *shape: int) -> Tensor:
        """N(0, 1) float32 of shape [count, *shape], hashed per (view, element) on the device.

        One hash per element pair gives two uniforms; Box-Muller turns them into two normals
        (cosine and sine branches). Tails are cut at about 5.7 sigma (23-bit uniforms).
        """
        n_per_view = math.prod(shape)
        pairs = (n_per_view + 1) // 2
        # The element counter is hashed before it meets the view's word (XOR, no carries), so
        # two views never get shifted copies of one noise sequence.
        elems = hash32(torch.arange(pairs, device=self.device, dtype=torch.int32) ^ 0x5BD1E995)
        base = hash32(self._view_words(stream)[:, None] ^ elems[None, :])  # [V, pairs]
        u1 = _unit(base)
        u2 = _unit(hash32(base ^ 0x68E31DA4))
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
        return z[:, :n_per_view].reshape(self.count, *shape)

    def pair_rand(self, stream: str) -> Tensor:
        """U(0, 1) float32 [count, count] for every ordered pair of local views (hashed)."""
        rows = self._view_words(stream)
        cols = hash32(self.index.to(device=self.device, dtype=torch.int32) ^ 0x2C1B3C6D)
        return _unit(hash32(rows[:, None] ^ cols[None, :]))
