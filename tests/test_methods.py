"""Distillation methods as plug-ins: the registry, spec parsing, golden values, training, checkpoints."""

from __future__ import annotations

import csv
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from cqkd.core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def _row_config(row: dict[str, str]) -> RunConfig:
    """The RunConfig of one row of a results CSV (the CSV stores every config field as text)."""
    hints = typing.get_type_hints(RunConfig)
    raw: dict[str, typing.Any] = {}
    for f in fields(RunConfig):
        if f.name not in row:
            continue
        text = row[f.name]
        if text == "":
            raw[f.name] = None
        elif hints[f.name] is bool:
            raw[f.name] = text == "True"
        else:
            raw[f.name] = text
    return RunConfig.from_dict(raw)


def test_default_method_keeps_every_study_runs_config_digest():
    """The default method (kd) is not in the digest: every finished run of the committed study
    (docs/results/fashion-mnist-results.csv, 96 rows) keeps the config_digest it was recorded with,
    so a sweep recognises its finished runs."""
    with open(ROOT / "docs/results/fashion-mnist-results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96
    for row in rows:
        cfg = _row_config(row)
        assert cfg.method == "kd"
        assert cfg.digest() == row["config_digest"], row["run"]
        if cfg.kind == "distill":  # another method is another run
            assert cfg.replace(method="dkd").digest() != row["config_digest"]
