"""Empirical risk minimisation: pool all source domains and minimise cross-entropy (DomainBed's ERM)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import Classifier, Featurizer
from .base import Algorithm, Minibatches, RunContext, register


@register("ERM")
class ERM(Algorithm):
    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        num_domains: int,
        hparams: dict,
        pretrained: str | None = None,
        context: RunContext | None = None,
    ) -> None:
        super().__init__(input_shape, num_classes, num_domains, hparams, context)
        self.featurizer = Featurizer(input_shape, hparams, pretrained)
        self.classifier = Classifier(self.featurizer.n_outputs, num_classes, hparams["nonlinear_classifier"])
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.optimizer = torch.optim.Adam(
            self.network.parameters(), lr=hparams["lr"], weight_decay=hparams["weight_decay"]
        )

    def update(self, minibatches: Minibatches) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.predict(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)
