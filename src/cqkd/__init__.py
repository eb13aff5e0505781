"""cqkd: cross-quality knowledge distillation.

A teacher trained on full-resolution images transfers its knowledge to a student that only
ever sees degraded (low-resolution) views of the same images (Čuk et al., 2023,
arXiv:2304.07593). The library API lives in the submodules; ``cqkd.cli`` is a thin front end.
"""

__version__ = "0.1.0"
