"""Using a trained run: predict on images (``load_predictor``), export to ONNX / TorchScript (``export_run``)."""

from cqkd.deploy.export import export_run
from cqkd.deploy.files import predict_files
from cqkd.deploy.images import find_images
from cqkd.deploy.predictor import Predictions, Predictor, load_predictor

__all__ = ["Predictions", "Predictor", "export_run", "find_images", "load_predictor", "predict_files"]
