"""ERM on real ∪ synthetic images: the shared base of DomainFusion and the generative baselines (CDGA, DSI).

Each step sees as many images as an ERM step: the per-domain batches, with a `synthetic_fraction` of their images
replaced by images drawn from an on-disk `SyntheticPool` (taken evenly off the end of each domain's batch, so every
domain keeps its share). It minimises the mean cross-entropy over all of them plus an optional extra loss on the
source part (DomainFusion's latent distillation). Keeping the classifier's work per step equal to ERM's makes
"identical budget" comparisons fair and leaves the LDM as the only extra cost. Subclasses decide what the pool holds
and when it changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..data.pool import Chunk, SyntheticPool
from ..errors import UserError
from ..utils import seed_hash
from .base import Minibatches, RunContext
from .erm import ERM


class PoolERM(ERM):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        if context is None:
            raise UserError(
                f"{type(self).__name__} generates images and needs a run context: train it with "
                "`domainfusion train` (or pass `context=` when building it in Python)"
            )
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        self.input_shape = tuple(input_shape)
        self.pool: SyntheticPool | None = None
        # Wall time spent generating images (offline before training, or in refreshes); a buffer, so checkpoints
        # carry it across a resume.
        self.register_buffer("generation_s", torch.zeros((), dtype=torch.float64))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.pool_generator = torch.Generator().manual_seed(seed_hash(context.seed, "pool_batch"))

    def open_or_create_pool(
        self, folder: str, chunks: Callable[[], Iterable[Chunk]], generated: int = 0
    ) -> SyntheticPool:
        """The pool in OUTPUT_DIR/`folder`: reopened when resuming (the checkpoint restored it), else built from
        `chunks()` (which may generate images: timed as generation)."""
        root = self.context.output_dir / folder
        if self.context.resume and (root / "manifest.json").is_file():
            return SyntheticPool(root)
        with self.generating():
            return SyntheticPool.create(root, chunks(), generated=generated)

    @contextmanager
    def generating(self) -> Iterator[None]:
        """Count the wall time of a block as generation time (reported with the generated-image count)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.generation_s += time.perf_counter() - start

    def before_step(self) -> None:
        """Hook run before each step (DomainFusion refreshes its pool here)."""

    def extra_loss(
        self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor | float, dict[str, float]]:
        """A loss added to the cross-entropy, from the step's images (the first `n_source` real, the rest drawn from
        the pool) and the logits already computed on them."""
        return 0.0, {}

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        self.before_step()
        total = sum(len(y) for _, y in minibatches)
        n_synthetic = round(self.hparams["synthetic_fraction"] * total) if self.pool is not None else 0
        x, y = (torch.cat(parts) for parts in zip(*keep_source(minibatches, n_synthetic)))
        inputs, targets = x, y
        if n_synthetic:
            px, py = self.pool.sample(n_synthetic, self.pool_generator)
            inputs, targets = torch.cat([x, px.to(x.device)]), torch.cat([y, py.to(y.device)])
        logits = self.predict(inputs)
        ce = F.cross_entropy(logits, targets)
        extra, values = self.extra_loss(logits, inputs, targets, len(x))
        loss = ce + extra
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps_done += 1
        return {"loss": loss.item(), "ce_loss": ce.item(), **values}

    def checkpoint_stats(self) -> dict[str, float]:
        if self.pool is None:
            return {"generated_images": 0, "generation_s": 0.0}
        return {
            "generated_images": self.pool.generated,
            "generation_s": self.generation_s.item(),
            "pool_size": len(self.pool),
            "pool_refreshes": self.pool.refreshes,
        }


def keep_source(minibatches: Minibatches, n_drop: int) -> Minibatches:
    """Drop `n_drop` images off the ends of the domain batches, as evenly as possible (earlier domains first)."""
    base, extra = divmod(n_drop, len(minibatches))
    kept = []
    for i, (x, y) in enumerate(minibatches):
        keep = max(0, len(y) - base - (i < extra))
        kept.append((x[:keep], y[:keep]))
    return kept
