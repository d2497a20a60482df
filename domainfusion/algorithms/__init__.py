"""Algorithms on the DomainBed contract; importing this package registers all of them."""

from . import erm  # noqa: F401  (registers ERM)
from .base import ALGORITHMS, Algorithm, algorithm_class, register

__all__ = ["ALGORITHMS", "Algorithm", "algorithm_class", "register"]
