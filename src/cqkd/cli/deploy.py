"""The commands of deployment: predict and export."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from cqkd.cli.common import EXIT_SKIPPED
from cqkd.errors import CqkdError, unknown_name


def cmd_predict(args: argparse.Namespace) -> int:
    """``cqkd predict``: classify image files with a trained run and print or write the predictions."""
    from cqkd.core.io import check_output_file
    from cqkd.deploy.files import (
        FORMATS,
        format_predictions,
        predict_files,
        write_predictions,
    )
    from cqkd.deploy.predictor import load_predictor

    if args.format not in FORMATS:
        raise unknown_name("output format", args.format, FORMATS)
    if args.top_k < 1:
        raise CqkdError(f"--top-k must be at least 1, got {args.top_k}")
    if args.out:
        check_output_file(args.out, "--out")  # not a device, FIFO or socket (/dev/null included)
    if args.out and os.path.exists(args.out) and not args.force:
        raise CqkdError(f"--out {args.out!r} exists; pass --force to overwrite it")
    predictor = load_predictor(args.run, calibration=not args.no_calibration)
    result = predict_files(predictor, args.inputs, batch_size=args.batch_size, calibrated=not args.no_calibration,
                           skip_bad_images=args.skip_bad_images, progress=not args.quiet)
    text = format_predictions(result, args.top_k, args.format)
    if args.out:
        write_predictions(text, args.out, force=args.force)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    meta = predictor.meta
    if predictor.t_cal is not None:
        temperature = f"calibrated with T_cal = {predictor.t_cal:.4g} from calibration.json"
    elif args.no_calibration:
        temperature = "uncalibrated (T = 1, --no-calibration)"
    else:
        temperature = f"uncalibrated (T = 1: no calibration.json; `cqkd calibrate {args.run}` fits one)"
    line = (f"cqkd: predicted {len(result.paths)} image(s) with {meta['kind']} run {args.run} ({meta['model']} at "
            f"{predictor.input_size} px); probabilities {temperature}")
    if result.skipped:
        names = ", ".join(p for p, _ in result.skipped[:5]) + (", ..." if len(result.skipped) > 5 else "")
        line += f"; skipped {len(result.skipped)} unreadable file(s): {names}"
    if args.out:
        line += f"; written: {args.out}"
    print(line, file=sys.stderr)
    return EXIT_SKIPPED if result.skipped else 0


def cmd_export(args: argparse.Namespace) -> int:
    """``cqkd export``: export a run's model to a deployable format and check its parity on test images."""
    from cqkd.deploy.export import export_run

    done = export_run(args.run, args.format, args.out, with_preprocessing=args.with_preprocessing,
                      force=args.force, parity_samples=args.parity_samples)
    p = done.card["parity"]
    print(f"written: {done.path} and {done.card_path} ({p['runtime']} on {p['n']} test images: top-1 agrees on "
          f"all, max |Δlogit| = {p['max_abs_logit_diff']:.2e} <= {p['tolerance']:g})")
    return 0


def add_deploy_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("predict", cmd_predict, "classify image files with a run's model (a student or a teacher)",
            "Classify image files (PNG, JPEG, ...: whatever torchvision or PIL decodes; any size, grey or colour) "
            "with the model of RUN_DIR. Each image gets the run's own evaluation preprocessing: its channels "
            "(grey <-> RGB), its evaluation view at full resolution (image folders: resize + centre crop; "
            "28/32 px datasets: other sizes resized so the shorter side fits, centre square), the run's "
            "degradation to the student's size (without its random noise) and normalisation. Probabilities are "
            "calibrated with the run's T_cal when it has a calibration.json. One row per image: path, top-k "
            "classes and probabilities. Needs the run's dataset (class names, normalisation).")
    p.epilog = ("exit status: 0 every image predicted; 2 an error (bad option, missing run, unreadable file, no "
                "images), nothing written; 3 with --skip-bad-images: some files were unreadable and skipped "
                "(named on stderr), the others predicted and written")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, or directories (searched recursively)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the rows to FILE (atomically; default: stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--format", default="csv", metavar="FMT", help="csv or jsonl (default: csv)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="classes per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per forward pass (default: 256)")
    p.add_argument("--no-calibration", action="store_true", help="plain softmax(logits), ignoring calibration.json")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count unreadable files (exit status 3) instead of stopping at the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = add("export", cmd_export, "export a run's model to ONNX or TorchScript with a model card",
            "Write the model of RUN_DIR as ONNX (dynamic batch, checked with onnx.checker) or TorchScript, and a "
            "model card (JSON, beside it: input size, channels, mean/std, class names, degradation, T_cal, "
            "cqkd version, sha256 of the weights, parity numbers). The exported file is run on the run's test "
            "split next to PyTorch; unless the top-1 agrees on every image and the logits within 1e-4, the "
            "export fails (exit 1) and nothing is written. ONNX needs the packages of `pip install 'cqkd[export]'`.")
    p.add_argument("run", metavar="RUN_DIR")
    p.add_argument("--format", default="onnx", metavar="FMT", help="onnx or torchscript (default: onnx)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the file to write (default: RUN_DIR/export/model[-preprocessing].onnx or .torchscript.pt); "
                        "the card goes to FILE's stem + .card.json")
    p.add_argument("--with-preprocessing", action="store_true",
                   help="the graph takes uint8 images (N, C, S, S) at the full resolution and degrades and "
                        "normalises them itself (default: it takes the normalised student input)")
    p.add_argument("--parity-samples", type=int, default=None, metavar="N",
                   help="check parity on the first N test images only (default: the whole test split)")
    p.add_argument("--force", action="store_true", help="overwrite an existing export")


