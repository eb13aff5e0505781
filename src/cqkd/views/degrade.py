"""Degradations: the map from a full-resolution view x_hr to the student's view x_lr.

A degradation acts on a whole batch of float images in [0, 1], shape (N, C, H, W), on
whatever device the batch is on. It is described by a spec string such as
``"size=7,mode=bilinear"`` so that it can live in configs, run names and sweep grids.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from cqkd.errors import CqkdError

MODES = ("bilinear", "bicubic", "area", "nearest")


@dataclass(frozen=True)
class Degradation:
    """Resize to ``size`` x ``size`` (optionally blur, add noise, and upsample back).

    Attributes:
        size: output side length in pixels (the student's input size unless ``upsample``).
        mode: interpolation mode for the resize.
        antialias: low-pass filter before downsampling (bilinear/bicubic), as a camera would.
        blur: Gaussian blur sigma in output pixels applied after resizing (0 = off).
        noise: std of additive Gaussian noise in [0, 1] pixel units (0 = off).
        upsample: resize the degraded image back to the input size (for students that need
            a fixed input size); the default feeds the student at its native size.
    """

    size: int
    mode: str = "bilinear"
    antialias: bool = True
    blur: float = 0.0
    noise: float = 0.0
    upsample: bool = False

    def __post_init__(self) -> None:
        if self.size < 1:
            raise CqkdError(f"--size must be at least 1, got {self.size}")
        if self.mode not in MODES:
            raise CqkdError(f"unknown resize mode {self.mode!r} (valid: {', '.join(MODES)})")
        if self.blur < 0 or self.noise < 0:
            raise CqkdError("degradation blur and noise must be >= 0")

    @classmethod
    def parse(cls, spec: str) -> "Degradation":
        """Parse ``"size=7,mode=bicubic,antialias=false"`` (a bare number means the size)."""
        kwargs: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                key, value = "size", part
            key = key.strip()
            if key not in types:
                raise CqkdError(f"unknown degradation key {key!r} in {spec!r} (valid: {', '.join(types)})")
            try:
                if types[key] in ("bool", bool):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError
                    kwargs[key] = value.lower() in ("1", "true", "yes")
                elif types[key] in ("int", int):
                    kwargs[key] = int(value)
                elif types[key] in ("float", float):
                    kwargs[key] = float(value)
                else:
                    kwargs[key] = value
            except ValueError:
                raise CqkdError(f"bad value {value!r} for degradation key {key!r}") from None
        if "size" not in kwargs:
            raise CqkdError(f"degradation spec {spec!r} has no size")
        return cls(**kwargs)  # type: ignore[arg-type]

    def spec(self) -> str:
        """The canonical spec string (only non-default fields besides size)."""
        default = Degradation(size=self.size)
        parts = [f"size={self.size}"]
        for key, value in asdict(self).items():
            if key != "size" and value != getattr(default, key):
                parts.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return ",".join(parts)

    def output_size(self, input_size: int) -> int:
        """The side of the degraded view for inputs of side ``input_size``."""
        return input_size if self.upsample else self.size

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Degrade a float batch in [0, 1] of shape (N, C, H, W)."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        in_h, in_w = x.shape[-2:]
        if (in_h, in_w) != (self.size, self.size):
            antialias = self.antialias and self.mode in ("bilinear", "bicubic")
            align = False if self.mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                              antialias=antialias, align_corners=align)
        if self.blur > 0:
            x = _gaussian_blur(x, self.blur)
        if self.noise > 0:
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            x = x + self.noise * noise
        x = x.clamp_(0, 1) if self.mode == "bicubic" or self.noise > 0 else x
        if self.upsample and (in_h, in_w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(in_h, in_w), mode="bilinear", align_corners=False)
        return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's separable Gaussian blur with a kernel of radius ~3 sigma (reflect padding)."""
    from torchvision.transforms.v2.functional import gaussian_blur

    size = 2 * max(1, int(3 * sigma + 0.5)) + 1
    return gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def upsample_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of a low-resolution batch back to ``size`` (to feed a teacher)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
