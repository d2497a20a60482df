"""domainfusion: diffusion-powered domain generalization with DomainBed-exact evaluation."""

__version__ = "0.1.0"
