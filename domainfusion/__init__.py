"""domainfusion: diffusion-powered domain generalization with DomainBed-exact evaluation.

The Python API (README, "From Python"): `default_hparams`, `resolve_hparams`, `algorithm_class`, `RunContext`. They
load on first use, so `import domainfusion` (and the CLI's start) does not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .algorithms import RunContext, algorithm_class
    from .hparams import default_hparams, resolve_hparams

__version__ = "0.1.0"
__all__ = ["RunContext", "algorithm_class", "default_hparams", "resolve_hparams"]
_HOMES = {
    "RunContext": "algorithms",
    "algorithm_class": "algorithms",
    "default_hparams": "hparams",
    "resolve_hparams": "hparams",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
