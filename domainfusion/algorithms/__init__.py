"""Algorithms on the DomainBed contract; importing this package registers all of them.

ERM needs only torch; the generative algorithms import diffusers when they are first registered, which is cheap
next to loading any dataset.
"""

from . import cdga, domainfusion, dsi, erm  # noqa: F401  (registration side effects)
from .base import ALGORITHMS, Algorithm, RunContext, algorithm_class, register

__all__ = ["ALGORITHMS", "Algorithm", "RunContext", "algorithm_class", "register"]
