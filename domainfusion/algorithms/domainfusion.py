"""DomainFusion (ECCV 2024) and its ablations, on the Algorithm contract; the method itself is in `method/`.

Loss per step: cross-entropy on source ∪ pool batches + λ_LD · L_LD on a sub-batch (of the source images for the
paper's confidence target, of source and pool images for the posterior target).
The ablations are the same class with parts switched off, so one `--algorithm` option selects them and result
tables show each as its own row: DomainFusion_LD (latent distillation only), DomainFusion_Aug (online augmentation
only) and DomainFusion_RandSel (random candidate selection instead of most-different style / most-similar content).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..data.pool import Chunk, subset_chunks
from ..method.latent_distillation import LatentDistillation, LDSettings
from ..method.online_augmentation import AugSettings, OnlineAugmentation
from ..utils import seed_hash
from .base import RunContext, register
from .generative import PoolERM


@register("DomainFusion")
class DomainFusion(PoolERM):
    LATENT_DISTILLATION = True
    AUGMENTATION = True
    SELECTION = "style_content"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, pretrained, context)
        ldm = context.ldm()
        prompts = context.class_prompts()
        self.ld = (
            LatentDistillation(ldm, prompts, LDSettings.from_hparams(hparams)) if self.LATENT_DISTILLATION else None
        )
        self.ld_generator = torch.Generator().manual_seed(seed_hash(context.seed, "latent_distillation"))
        self.augmentation = None
        if self.AUGMENTATION:
            settings = AugSettings.from_hparams(hparams, self.SELECTION)

            def initial() -> Iterable[Chunk]:
                return subset_chunks(
                    context.train_splits, settings.pool_fraction, seed_hash(context.seed, "pool"), context.num_workers
                )

            self.pool = self.open_or_create_pool("pool", initial)
            # refresh_from=source: a frozen copy of the pool's real images, which every refresh edits afresh.
            origin = self.open_or_create_pool("pool_origin", initial) if settings.refresh_from == "source" else None
            styled = {
                "none": lambda: [[p] for p in prompts],
                "source_domains": context.source_domain_prompts,
                "vocabulary": context.style_vocabulary_prompts,
            }[settings.style_words]()
            self.augmentation = OnlineAugmentation(
                ldm,
                self.pool,
                styled,
                self.input_shape,
                settings,
                context.seed,
                context.output_dir / "pool_grids",
                origin,
            )

    def before_step(self) -> None:
        epoch = self.steps_done.item() / self.context.steps_per_epoch
        if self.augmentation is not None and self.augmentation.due(epoch):
            with self.generating():
                self.augmentation.refresh()

    def extra_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, n_source: int):
        """λ_LD · L_LD on a random sub-batch: of the source images for the paper's confidence target (method.md), of
        source and pool images for the posterior target (the LDM judges synthetic images as well)."""
        if self.ld is None:
            return 0.0, {}
        n = n_source if self.ld.settings.target == "confidence" else len(x)
        keep = torch.randperm(n, generator=self.ld_generator)[: self.ld.settings.batch_size].to(x.device)
        out = self.ld(logits[keep], x[keep], y[keep], self.ld_generator)
        return self.ld.settings.weight * out.loss, {
            "ld_loss": out.loss.item(),
            "confidence": out.confidence.mean().item(),
            "ld_unet_evals": float(out.unet_evals),
        }


@register("DomainFusion_LD")
class DomainFusionLD(DomainFusion):
    AUGMENTATION = False


@register("DomainFusion_Aug")
class DomainFusionAug(DomainFusion):
    LATENT_DISTILLATION = False


@register("DomainFusion_RandSel")
class DomainFusionRandomSelection(DomainFusion):
    SELECTION = "random"
