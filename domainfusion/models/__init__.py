"""Classifier networks: DomainBed's featurizers and classifier heads."""

from .networks import MNIST_CNN, Classifier, Featurizer, ResNet

__all__ = ["MNIST_CNN", "Classifier", "Featurizer", "ResNet"]
