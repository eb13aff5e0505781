"""Shared fixtures: tiny runs on the synthetic dataset, trained once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

TINY = dict(dataset="synthetic", train_samples=300, epochs=1, batch_size=64, seed=0, accelerator="cpu")


def cli_env() -> dict[str, str]:
    """Environment for running ``python -m cqkd`` from this checkout in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cqkd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cqkd", *args]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A cnn-small teacher trained for one epoch on 300 synthetic 28 px images."""
    from cqkd.core.config import RunConfig
    from cqkd.train.fit import fit_run

    out = tmp_path_factory.mktemp("teacher") / "teacher"
    fit_run(RunConfig.from_dict({**TINY, "model": "cnn-small", "size": 28, "epochs": 2}), out, progress=False)
    return out
