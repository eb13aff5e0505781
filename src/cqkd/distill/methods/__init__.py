"""Distillation methods as plug-ins: one module per method, registered by name here.

``METHODS`` maps a name to its ``Method`` subclass; ``make_method(spec, settings)`` parses a
spec string such as ``dkd,beta=8,warmup=20`` and returns the method. Adding one: docs/extending.md.
"""

from __future__ import annotations

from cqkd.distill.methods.at import AT
from cqkd.distill.methods.base import (
    Method,
    Needs,
    Outputs,
    Progress,
    Settings,
    parse_spec,
)
from cqkd.distill.methods.ctkd import CTKD
from cqkd.distill.methods.dist import DIST
from cqkd.distill.methods.dkd import DKD
from cqkd.distill.methods.fitnet import FitNet
from cqkd.distill.methods.kd import KD
from cqkd.distill.methods.tfkd import TFKD

METHODS: dict[str, type[Method]] = {m.name: m for m in (KD, DKD, DIST, CTKD, TFKD, FitNet, AT)}

__all__ = ["METHODS", "Method", "Needs", "Outputs", "Progress", "Settings", "check_method", "make_method"]


def check_method(spec: str) -> type[Method]:
    """Validate a method spec (name, options, ranges); ``CqkdError`` naming the bad part."""
    return parse_spec(spec, METHODS)[0]


def make_method(spec: str, settings: Settings) -> Method:
    """The method of ``spec`` with the run's ``settings``."""
    cls, values = parse_spec(spec, METHODS)
    return cls(values, settings)
