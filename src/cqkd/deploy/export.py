"""Exporting a run's model to ONNX or TorchScript, checked on its test split, with a model card."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cqkd import __version__
from cqkd.core import faults
from cqkd.core.io import check_output_file, check_replaceable, file_sha256, write_json
from cqkd.data.folder import eval_resize
from cqkd.data.registry import make_loader
from cqkd.deploy.predictor import Predictor, open_run
from cqkd.errors import CqkdError, RunFailed, RunInterrupted, unknown_name
from cqkd.views.degrade import Degradation

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # the largest |logit difference| (fp32) an export may have against PyTorch
OPSET = 20  # Resize with antialias (bilinear/bicubic downscaling) needs opset 18 or later


@dataclass
class Exported:
    """Where an export was written, and its model card."""

    path: Path
    card_path: Path
    card: dict[str, Any]


class ExportFailed(RunFailed):
    """An export that failed: the exporter, onnx.checker or the parity check (the CLI exits 1)."""


@dataclass
class Parity:
    """How an exported model's logits compare with PyTorch's on ``n`` test images."""

    runtime: str
    split: str
    n: int
    max_abs_logit_diff: float
    top1_agreement: float
    top1_disagreements: int
    tolerance: float = TOLERANCE

    @property
    def ok(self) -> bool:
        """Whether the export agrees on every top-1 and its logits are within the tolerance."""
        return self.top1_disagreements == 0 and self.max_abs_logit_diff <= self.tolerance


def require_onnx() -> None:
    """Fail with one line when the ONNX packages (the ``export`` extra) are missing."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]
    if missing:
        raise CqkdError(f"ONNX export needs {', '.join(missing)}: pip install 'cqkd[export]'")


def _importable(module: str) -> bool:

    return importlib.util.find_spec(module) is not None


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, input_name: str = "images") -> None:
    """Write ``module`` (eval mode) as ONNX with a dynamic batch dimension and check the file."""
    require_onnx()
    import onnx  # optional backend: imported only when asked for

    chatter = io.StringIO()
    try:
        faults.point("export")
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), str(path), dynamo=True, external_data=False,
                              opset_version=OPSET, input_names=[input_name], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter's many failure types, reported in one line
        reraise_interruption(e)
        raise ExportFailed(f"the ONNX exporter failed: {type(e).__name__}: {_first_line(e)}") from None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # noqa: BLE001
        reraise_interruption(e)
        raise ExportFailed(f"onnx.checker rejects the exported model: {_first_line(e)}") from None


def reraise_interruption(e: BaseException) -> None:
    """Raise the signal behind ``e`` (SIGTERM's ``RunInterrupted``, Ctrl-C), also when an exporter
    wrapped it in an error of its own: an interruption is never reported as a failed export."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (RunInterrupted, KeyboardInterrupt)):
            raise cause from None
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session on ``path`` (``threads`` intra-op threads; None: torch's count)."""
    require_onnx()
    import onnxruntime as ort  # optional backend: imported only when asked for

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_torchscript(module: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> None:
    """Write ``module`` (eval mode) traced to TorchScript."""
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; tracing still works
            traced = torch.jit.trace(module.eval(), (example,), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as e:  # noqa: BLE001 - the tracer's many failure types, reported in one line
        reraise_interruption(e)
        raise ExportFailed(f"TorchScript tracing failed: {type(e).__name__}: {_first_line(e)}") from None


def _runner(fmt: str, path: Path) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function that runs the exported file on a batch, and the runtime's name."""
    if fmt == "onnx":
        import onnxruntime as ort  # optional backend: imported only when asked for

        session = onnx_session(path)
        name = session.get_inputs()[0].name
        return (lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])), f"onnxruntime {ort.__version__}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return loaded(x)
    return run, f"torch.jit {torch.__version__}"


def check_parity(predictor: Predictor, run_exported: Callable[[torch.Tensor], torch.Tensor], runtime: str,
                 test: Any, with_preprocessing: bool, limit: int | None = None, batch_size: int = 256,
                 tolerance: float = TOLERANCE) -> Parity:
    """Compare the exported model with PyTorch on the test split's full-resolution images."""
    n = disagree = 0
    worst = 0.0
    with torch.inference_mode():
        for x, _, _ in make_loader(test, batch_size, shuffle=False):
            if limit is not None and n >= limit:
                break
            if limit is not None:
                x = x[: limit - n]
            if with_preprocessing:  # the graph takes the uint8 images
                inp = x
                ref = predictor(inp)
            else:  # the graph takes the normalised, degraded images
                inp = predictor.preprocess(x)
                ref = predictor.model(inp)
            got = run_exported(inp.contiguous()).float()
            if got.shape != ref.shape:
                raise ExportFailed(f"the exported model returns shape {tuple(got.shape)} for a batch of {len(x)}, "
                                  f"PyTorch {tuple(ref.shape)}")
            worst = max(worst, float((got - ref).abs().max()))
            disagree += int((got.argmax(-1) != ref.argmax(-1)).sum())
            n += len(x)
    if n == 0:
        raise CqkdError("the test split is empty: nothing to check the export on")
    return Parity(runtime, "test", n, worst, (n - disagree) / n, disagree, tolerance)


def default_out(run: str | os.PathLike, fmt: str, with_preprocessing: bool) -> Path:
    """RUN/export/model[-preprocessing].onnx (or .torchscript.pt)."""
    return Path(run) / "export" / f"model{'-preprocessing' if with_preprocessing else ''}{SUFFIXES[fmt]}"


def card_path(out: str | os.PathLike) -> Path:
    """The model card beside an exported file: model.onnx -> model.card.json,
    model.torchscript.pt -> model.torchscript.card.json."""
    return Path(out).with_suffix(".card.json")


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
               with_preprocessing: bool = False, force: bool = False,
               parity_samples: int | None = None) -> Exported:
    """Export the run's model as ``fmt`` to ``out`` with a model card beside it (``card_path``).

    The exported file runs on the run's test split next to PyTorch; unless top-1 agrees on every
    image and the logits agree within ``TOLERANCE``, nothing is written and ``ExportFailed`` says why.
    ``with_preprocessing``: the graph takes uint8 images (N, C, S, S) at the full resolution and
    degrades and normalises them itself; otherwise it takes the normalised student input.
    """
    if fmt not in FORMATS:
        raise unknown_name("export format", fmt, FORMATS)
    if parity_samples is not None and parity_samples < 1:
        raise CqkdError(f"--parity-samples must be at least 1, got {parity_samples}")
    if fmt == "onnx":
        require_onnx()
    in_run = out is None
    out = Path(out) if out is not None else default_out(run, fmt, with_preprocessing)
    card_file = card_path(out)
    if in_run and out.parent.is_symlink():  # RUN/export: never followed out of the run
        raise CqkdError(f"{out.parent} is a symbolic link; cqkd writes only inside the run directory "
                        "(replace it with a directory, or name a file with --out)")
    for f in (out, card_file):
        if f.is_dir():
            raise CqkdError(f"--out: {str(f)!r} is a directory")
        check_output_file(f, "--out")
        if f.exists() and not force:
            raise CqkdError(f"{str(f)!r} exists; pass --force to overwrite it")
    predictor, cfg, splits = open_run(run)
    trained = cfg.degradation_spec()
    if with_preprocessing and trained.random:
        raise CqkdError(f"--with-preprocessing: the run's degradation {trained.spec()!r} is random (noise or a JPEG "
                        "quality range); export without --with-preprocessing and degrade the inputs yourself")
    predictor = predictor.cpu()
    c, s = predictor.channels, predictor.image_size
    if with_preprocessing:
        module: nn.Module = predictor
        example = torch.zeros(2, c, s, s, dtype=torch.uint8)
    else:
        module = predictor.model
        example = torch.zeros(2, c, predictor.input_size, predictor.input_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if fmt == "onnx":
            export_onnx(module, example, tmp, "images" if with_preprocessing else "input")
        else:
            export_torchscript(module, example, tmp)
        runner, runtime = _runner(fmt, tmp)
        parity = check_parity(predictor, runner, runtime, splits.test, with_preprocessing, parity_samples)
        if not parity.ok:
            raise ExportFailed(
                f"the {fmt} export does not reproduce PyTorch on the test split: top-1 agrees on "
                f"{parity.n - parity.top1_disagreements}/{parity.n} images, max |Δlogit| = "
                f"{parity.max_abs_logit_diff:.3g} (tolerance {parity.tolerance:g}); nothing written")
        card = model_card(predictor, fmt, out, tmp, with_preprocessing, parity)
        write_json(card_file, card)
        check_replaceable(out, "--out")  # (again: it may have appeared during the export)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(out, card_file, card)


def trained_on(spec: str) -> str:
    """One sentence on the views the model was trained on, for the model card."""
    d = Degradation.parse(spec)
    parts = [f"images resized to {d.size}x{d.size} px ({d.mode}{', antialiased' if d.antialias else ''})"]
    if d.blur:
        parts.append(f"Gaussian blur sigma {d.blur:g} px")
    if d.noise:
        parts.append(f"Gaussian noise std {d.noise:g} (not applied here)")
    q = d.jpeg_range
    if q is not None:
        quality = f"quality {q[0]}" if q[0] == q[1] else f"a quality drawn per image from {q[0]}-{q[1]}"
        parts.append(f"JPEG-compressed at {quality} (not applied here: feed already compressed images as they are)")
    return "trained on " + ", then ".join(parts)


def model_card(predictor: Predictor, fmt: str, out: Path, file: Path, with_preprocessing: bool,
               parity: Parity) -> dict[str, Any]:
    """What a deployment needs to know to feed the exported model and read its output."""
    meta = predictor.meta
    c, s, k = predictor.channels, predictor.image_size, len(predictor.classes)
    if with_preprocessing:
        inp = {"name": "images", "dtype": "uint8", "shape": ["batch", c, s, s],
               "description": f"images at the full resolution ({s} px, {c} channel(s), 0-255), the run's evaluation "
                              "view; the graph degrades and normalises them"}
    else:
        size = predictor.input_size
        inp = {"name": "input", "dtype": "float32", "shape": ["batch", c, size, size],
               "description": "the degraded image (see degradation) in [0, 1], normalised: (x - mean) / std"}
    if predictor.folder_crop is not None:
        view = (f"shorter side resized to {eval_resize(predictor.folder_crop)} px (antialiased bilinear), "
                f"central {predictor.folder_crop} px square")
    else:
        view = f"{s}x{s} images as they are; other sizes: shorter side resized to {s} px (antialiased bilinear), central square"
    card: dict[str, Any] = {
        "cqkd_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "format": fmt, "file": out.name, "file_sha256": file_sha256(file),
        "run": meta.get("run"), "kind": meta.get("kind"), "model": meta.get("model"), "dataset": meta.get("dataset"),
        "weights_sha256": file_sha256(meta["weights"]),
        "with_preprocessing": with_preprocessing, "input": inp,
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", k],
                   "description": "logits; probabilities = softmax(logits / t_cal) (t_cal null: softmax(logits))"},
        "image_size": s, "input_size": predictor.input_size, "channels": c,
        "mean": list(predictor.mean), "std": list(predictor.std), "classes": list(predictor.classes),
        "degradation": meta.get("degradation"), "degradation_applied": predictor.degradation.spec(),
        "trained_on": trained_on(str(meta.get("degradation"))),
        "eval_view": view, "t_cal": predictor.t_cal,
        "parity": asdict(parity),
        "torch_version": torch.__version__,
    }
    if fmt == "onnx":
        import onnx  # optional backend: imported only when asked for

        card["opset"] = OPSET
        card["onnx_version"] = onnx.__version__
    return card

