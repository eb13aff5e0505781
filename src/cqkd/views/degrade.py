"""Degradations: the map from a full-resolution view x_hr to the student's view x_lr.

A degradation acts on a whole batch of float images in [0, 1], shape (N, C, H, W), on
whatever device the batch is on. It is described by a spec string such as
``"size=7,mode=bilinear"`` so that it can live in configs, run names and sweep grids.
The chain runs in one fixed order: resize -> blur -> noise -> jpeg -> (upsample); see docs/quality.md.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms.v2.functional import gaussian_blur

from cqkd.errors import CqkdError

MODES = ("bilinear", "bicubic", "area", "nearest")
JPEG_SEED = 20_231_207  # quality draws of a JPEG range where no generator is given (evaluation): fixed


def parse_jpeg(value: str) -> tuple[int, int] | None:
    """``"25"`` -> (25, 25), ``"10-50"`` -> (10, 50), ``""`` -> None; qualities in [1, 100]."""
    value = value.strip()
    if not value:
        return None
    lo_text, sep, hi_text = value.partition("-")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if sep else lo
    except ValueError:
        raise CqkdError(f"bad value {value!r} for degradation key 'jpeg' (a quality Q or a range LO-HI)") from None
    if not (1 <= lo <= 100 and 1 <= hi <= 100):
        raise CqkdError(f"degradation jpeg={value!r}: a JPEG quality must be in [1, 100]")
    if lo > hi:
        raise CqkdError(f"degradation jpeg={value!r}: the range LO-HI needs LO <= HI")
    return lo, hi


@dataclass(frozen=True)
class Degradation:
    """Resize to ``size`` x ``size`` (optionally blur, add noise, JPEG-compress, and upsample back).

    Attributes:
        size: output side length in pixels (the student's input size unless ``upsample``).
        mode: interpolation mode for the resize.
        antialias: low-pass filter before downsampling (bilinear/bicubic), as a camera would.
        blur: Gaussian blur sigma in output pixels applied after resizing (0 = off).
        noise: std of additive Gaussian noise in [0, 1] pixel units (0 = off).
        jpeg: JPEG quality ``"Q"``, or a range ``"LO-HI"`` drawn per image (uniform integers)
            from the step's generator; ``""`` = off. A real libjpeg encode and decode.
        upsample: resize the degraded image back to the input size (for students that need
            a fixed input size); the default feeds the student at its native size.
    """

    size: int
    mode: str = "bilinear"
    antialias: bool = True
    blur: float = 0.0
    noise: float = 0.0
    jpeg: str = ""
    upsample: bool = False

    def __post_init__(self) -> None:
        if self.size < 1:
            raise CqkdError(f"--size must be at least 1, got {self.size}")
        if self.mode not in MODES:
            raise CqkdError(f"unknown resize mode {self.mode!r} (valid: {', '.join(MODES)})")
        if self.blur < 0 or self.noise < 0:
            raise CqkdError("degradation blur and noise must be >= 0")
        quality = parse_jpeg(str(self.jpeg))
        canonical = "" if quality is None else str(quality[0]) if quality[0] == quality[1] else f"{quality[0]}-{quality[1]}"
        object.__setattr__(self, "jpeg", canonical)

    @property
    def jpeg_range(self) -> tuple[int, int] | None:
        """The JPEG qualities (LO, HI), or None without JPEG."""
        return parse_jpeg(self.jpeg)

    @property
    def random(self) -> bool:
        """Whether the degradation draws random numbers (noise, or a JPEG quality range)."""
        q = self.jpeg_range
        return self.noise > 0 or (q is not None and q[0] != q[1])

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
        quality = self.jpeg_range
        if quality is not None:
            x = jpeg(x, self._qualities(len(x), quality, generator))
        if self.upsample and (in_h, in_w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(in_h, in_w), mode="bilinear", align_corners=False)
        return x


    @staticmethod
    def _qualities(n: int, quality: tuple[int, int], generator: torch.Generator | None) -> list[int]:
        """One quality per image: drawn after the noise, so adding JPEG leaves the noise draws as they were."""
        lo, hi = quality
        if lo == hi:
            return [lo] * n
        if generator is None:
            generator = torch.Generator().manual_seed(JPEG_SEED)
        return torch.randint(lo, hi + 1, (n,), generator=generator).tolist()


def jpeg(x: torch.Tensor, qualities: int | list[int]) -> torch.Tensor:
    """JPEG encode and decode a float batch in [0, 1] (N, C, H, W) with libjpeg at ``qualities`` (one per image).

    The images are rounded to 8 bits first, as a file would hold them; 1 or 3 channels (colour
    images use libjpeg's default 4:2:0 chroma subsampling). On CUDA the batch is encoded and
    decoded on the GPU (nvJPEG), elsewhere on the CPU; torchvision.io is the backend (why not
    TorchCodec: docs/quality.md)."""
    n, channels = len(x), x.shape[1]
    if channels not in (1, 3):
        raise CqkdError(f"degradation jpeg needs images with 1 or 3 channels, got {channels}")
    per_image = [qualities] * n if isinstance(qualities, int) else list(qualities)
    images = x.clamp(0, 1).mul(255).round_().to(torch.uint8)
    device = images.device if images.is_cuda else torch.device("cpu")
    images = images.to(device)
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * n
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs in favour of TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        for q in sorted(set(per_image)):
            rows = [i for i, qi in enumerate(per_image) if qi == q]
            encoded = encode_jpeg([images[i].contiguous() for i in rows], quality=q)
            # decode_jpeg reads the bytes from the CPU, and decodes on ``device`` (nvJPEG on CUDA)
            decoded = decode_jpeg([e.cpu() for e in encoded], mode=mode, device=device)
            for i, d in zip(rows, decoded):
                out[i] = d
    return torch.stack(out).to(x.device, torch.float32).div_(255).to(x.dtype)  # type: ignore[arg-type]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """torchvision's separable Gaussian blur with a kernel of radius ~3 sigma (reflect padding)."""
    size = 2 * max(1, int(3 * sigma + 0.5)) + 1
    return gaussian_blur(x, kernel_size=[size, size], sigma=[sigma, sigma])


def upsample_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of a low-resolution batch back to ``size`` (to feed a teacher)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
