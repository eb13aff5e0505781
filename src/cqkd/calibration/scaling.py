"""Temperature scaling (Guo et al., 2017) and the one ``calibration.json`` schema.

Schema 2, written by ``TemperatureScaler.save`` and by ``cqkd calibrate`` (a run's file)::

    schema: 2, method: "temperature"
    t_cal, t_min, t_max, at_bound        the temperature and the search range it was fitted in
    n_fit, nll_fit_before, nll_fit_after the fit: samples, NLL at T = 1 and at T_cal on them
    split                                the split it was fitted on (null: fitted outside a run)
    a run's file only: ece_bins, metrics ({split: n, top1, nll/ece_before/after}), weights_digest,
    model, dataset, degradation, time

Older files (no ``schema`` key) are read in both earlier layouts: the scaler's (``n``,
``nll_before``, ``nll_after``) and the run's (already ``n_fit``, ``nll_fit_*``, no search range).
Details: docs/architecture.md.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from cqkd.core.config import T_MAX, T_MIN
from cqkd.core.io import read_json, write_json
from cqkd.core.rundir import RunDir
from cqkd.errors import CqkdError

_GOLDEN = (math.sqrt(5) - 1) / 2  # 0.618...
SCHEMA = 2
T_RANGE = (T_MIN, T_MAX)  # the default search range of T_cal
_V1_SCALER_KEYS = {"n": "n_fit", "nll_before": "nll_fit_before", "nll_after": "nll_fit_after"}


def upgrade(data: Any, where: str = "calibration") -> dict[str, Any]:
    """``data`` of a calibration file in the current schema (a copy; older layouts converted);
    ``CqkdError`` naming ``where`` if it is not a temperature-scaling calibration."""
    if not isinstance(data, dict) or data.get("method", "temperature") != "temperature":
        raise CqkdError(f"{where}: not a temperature-scaling calibration")
    out = dict(data)
    version = out.get("schema", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CqkdError(f"{where}: schema={version!r} is not a calibration schema version")
    if version > SCHEMA:
        raise CqkdError(f"{where}: schema {version} was written by a newer cqkd (this one reads up to {SCHEMA})")
    if version == 1:
        for old, new in _V1_SCALER_KEYS.items():
            if old in out and new not in out:
                out[new] = out.pop(old)
        out.setdefault("split", None)
        out.setdefault("t_min", T_RANGE[0])
        out.setdefault("t_max", T_RANGE[1])
        out.setdefault("at_bound", False)
        out.update(schema=SCHEMA, method="temperature")
    return out


def _nll_at(logits: torch.Tensor, labels: torch.Tensor, t: float) -> float:
    return float(F.cross_entropy(logits / t, labels))


class TemperatureScaler:
    """One temperature for all classes: p = softmax(z / T_cal) (Guo et al., 2017).

    ``fit(logits, labels)`` minimises NLL(T) = −(1/N) Σ_i log softmax(z_i/T)_{y_i} over
    u = log T in ``[log t_min, log t_max]`` by golden-section search in float64 (to a width of
    ``tol`` in u). Guard: if the fitted NLL were higher than the NLL at T = 1 (it cannot be,
    up to rounding), T_cal = 1 is kept. ``transform(logits)`` returns z / T_cal.
    ``save``/``load`` use ``calibration.json`` (schema: module docstring). After ``fit``: ``nll_before`` (T = 1), ``nll_after``, ``n``
    and ``at_bound`` (the optimum lies at the edge of the search range, e.g. separable data
    whose NLL keeps falling as T → 0).
    """

    def __init__(self, t_cal: float | None = None, t_min: float = T_RANGE[0], t_max: float = T_RANGE[1],
                 tol: float = 1e-10) -> None:
        if not 0 < t_min < 1 < t_max:
            raise ValueError(f"need 0 < t_min < 1 < t_max, got {t_min}, {t_max}")
        if t_cal is not None and not (math.isfinite(t_cal) and t_cal > 0):
            raise ValueError(f"t_cal must be a finite number > 0, got {t_cal}")
        self.t_cal = t_cal
        self.t_min, self.t_max, self.tol = t_min, t_max, tol
        self.nll_before: float | None = None
        self.nll_after: float | None = None
        self.n: int | None = None
        self.at_bound = False

    def __repr__(self) -> str:
        return f"TemperatureScaler(t_cal={self.t_cal})"

    @property
    def fitted(self) -> bool:
        """Whether a temperature has been fitted (or loaded)."""
        return self.t_cal is not None

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> "TemperatureScaler":
        """Fit the NLL-minimising temperature in [t_min, t_max] to ``logits`` (N, K) and ``labels`` (N,); returns self."""
        z = logits.detach().cpu().double()
        y = labels.detach().cpu().long()
        if z.ndim != 2 or y.ndim != 1 or len(z) != len(y):
            raise ValueError(f"expected logits (N, K) and labels (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
        if len(y) == 0:
            raise ValueError("cannot fit a temperature on zero samples")
        if not torch.isfinite(z).all():
            raise ValueError("the logits contain NaN or infinite values")

        def f(u: float) -> float:
            return _nll_at(z, y, math.exp(u))

        lo, hi = math.log(self.t_min), math.log(self.t_max)
        a, b = lo, hi
        c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        fc, fd = f(c), f(d)
        while b - a > self.tol:
            if fc <= fd:  # the minimum lies in [a, d]
                b, d, fd = d, c, fc
                c = b - _GOLDEN * (b - a)
                fc = f(c)
            else:  # in [c, b]
                a, c, fc = c, d, fd
                d = a + _GOLDEN * (b - a)
                fd = f(d)
        # the ends of the range are candidates too (a monotone NLL ends there)
        candidates = [(fc, c), (fd, d), (f(lo), lo), (f(hi), hi)]
        best_f, best_u = min(candidates)
        nll_one = f(0.0)
        self.n = len(y)
        self.nll_before = nll_one
        if best_f <= nll_one:
            self.t_cal, self.nll_after = math.exp(best_u), best_f
            self.at_bound = best_u - lo < 1e-6 or hi - best_u < 1e-6
        else:  # guard: never worse than no scaling
            self.t_cal, self.nll_after, self.at_bound = 1.0, nll_one, False
        return self

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """z / T_cal (same dtype as ``logits``)."""
        if self.t_cal is None:
            raise RuntimeError("TemperatureScaler.transform called before fit (or load)")
        return logits / self.t_cal

    def fit_transform(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fit the temperature on ``logits`` and ``labels`` and return the rescaled logits."""
        return self.fit(logits, labels).transform(logits)

    # ---------------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """The fitted scaler as a JSON-ready dict in the ``calibration.json`` schema (split: None)."""
        return {"schema": SCHEMA, "method": "temperature", "t_cal": self.t_cal, "t_min": self.t_min,
                "t_max": self.t_max, "at_bound": self.at_bound, "n_fit": self.n,
                "nll_fit_before": self.nll_before, "nll_fit_after": self.nll_after, "split": None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "calibration") -> "TemperatureScaler":
        """A scaler from a calibration dict of any schema version; ``CqkdError`` naming ``where`` if it is not a valid one."""
        data = upgrade(data, where)
        t = data.get("t_cal")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise CqkdError(f"{where}: t_cal={t!r} is not a number > 0")
        if not T_MIN * (1 - 1e-9) <= t <= T_MAX * (1 + 1e-9):
            raise CqkdError(f"{where}: t_cal={t!r} lies outside the fitter's range [{T_MIN:g}, {T_MAX:g}]; "
                            "not a temperature cqkd fitted (refit it with `cqkd calibrate`)")
        scaler = cls(float(t), data["t_min"], data["t_max"])
        scaler.nll_before, scaler.nll_after = data.get("nll_fit_before"), data.get("nll_fit_after")
        scaler.n, scaler.at_bound = data.get("n_fit"), bool(data.get("at_bound", False))
        return scaler

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted temperature as JSON (atomically)."""
        if self.t_cal is None:
            raise RuntimeError("nothing to save: the scaler is not fitted")
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TemperatureScaler":
        """A scaler from a ``calibration.json`` file."""
        return cls.from_dict(read_json(path), where=str(path))


def read_calibration(run_path: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``calibration.json`` (checked, in the current schema), or None when there is none."""
    file = RunDir(run_path).calibration_file
    if not file.exists():
        return None
    data = upgrade(read_json(file), where=str(file))
    TemperatureScaler.from_dict(data, where=str(file))  # validates t_cal
    return data


def _checked_t_cal(data: dict[str, Any], run_path: str | os.PathLike) -> float:
    """T_cal, with a warning when it sits at the edge of the search range: e.g. a teacher that
    classifies its whole val split correctly, whose NLL keeps falling as T -> 0, so that
    z_t / T_cal turns the soft targets into (nearly) one-hot ones."""
    t_cal = float(data["t_cal"])
    if data.get("at_bound"):
        val = data.get("metrics", {}).get("val", {}) if isinstance(data.get("metrics"), dict) else {}
        top1 = val.get("top1") if isinstance(val, dict) and isinstance(val.get("top1"), (int, float)) else float("nan")
        warnings.warn(f"T_cal = {t_cal:g} of {str(run_path)!r} lies at the edge of the search range (val "
                      f"top-1 {top1:.4f}); "
                      "temperature scaling has no interior optimum for this teacher", stacklevel=3)
    return t_cal
