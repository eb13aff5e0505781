"""Batch-level augmentation with explicit view parameters.

A *view* of an image is described by integers: a horizontal flip bit and a translation
(dx, dy) in pixels. Sampling the parameters and applying them are separate steps, so the
same parameters can (a) produce the teacher's full-resolution view and, after degradation,
the student's view of the *same* crop, and (b) be stored next to cached teacher outputs.
Everything runs on whole uint8 or float batches on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cqkd.errors import CqkdError


@dataclass(frozen=True)
class ViewSpec:
    """Random horizontal flip and a random integer translation of up to ``translate`` px.

    Translations pad with zeros (the background of Fashion-MNIST and the synthetic data).
    ``ViewSpec(flip=False, translate=0)`` is the identity (no augmentation).
    """

    flip: bool = True
    translate: int = 2

    def __post_init__(self) -> None:
        if self.translate < 0:
            raise CqkdError(f"translate must be >= 0, got {self.translate}")

    @classmethod
    def parse(cls, spec: str) -> "ViewSpec":
        """``"flip,translate=2"``, ``"translate=4"`` or ``"none"``."""
        spec = spec.strip()
        if spec in ("none", "off", ""):
            return cls(flip=False, translate=0)
        flip, translate = False, 0
        for part in (p.strip() for p in spec.split(",")):
            key, _, value = part.partition("=")
            if key == "flip":
                flip = value.lower() not in ("0", "false", "no") if value else True
            elif key == "translate":
                try:
                    translate = int(value)
                except ValueError:
                    raise CqkdError(f"bad translate value {value!r} in augmentation {spec!r}") from None
            else:
                raise CqkdError(f"unknown augmentation {key!r} in {spec!r} (valid: flip, translate=N, none)")
        return cls(flip=flip, translate=translate)

    def spec(self) -> str:
        """The views as a spec string (``none``, or e.g. ``flip,translate=4``)."""
        if self.is_identity:
            return "none"
        parts = (["flip"] if self.flip else []) + ([f"translate={self.translate}"] if self.translate else [])
        return ",".join(parts)

    @property
    def is_identity(self) -> bool:
        """Whether the views are the image itself (no flip, no translation)."""
        return not self.flip and self.translate == 0

    @property
    def num_views(self) -> int:
        """How many distinct views an image has under this spec."""
        return (2 if self.flip else 1) * (2 * self.translate + 1) ** 2

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Draw parameters for ``n`` images: int64 tensor (n, 3) of (flip, dx, dy), on CPU."""
        params = torch.zeros(n, 3, dtype=torch.int64)
        if self.flip:
            params[:, 0] = torch.randint(0, 2, (n,), generator=generator)
        if self.translate:
            t = self.translate
            params[:, 1:] = torch.randint(-t, t + 1, (n, 2), generator=generator)
        return params

    def enumerate(self) -> torch.Tensor:
        """All distinct views as an int64 tensor (num_views, 3)."""
        flips = [0, 1] if self.flip else [0]
        shifts = range(-self.translate, self.translate + 1)
        return torch.tensor([(f, dx, dy) for f in flips for dx in shifts for dy in shifts], dtype=torch.int64)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """A view batch as float in [0, 1] (uint8 images are divided by 255)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def apply_views(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-image (flip, dx, dy) to a batch (N, C, H, W) of any dtype, on its device.

    A positive dx moves the content right, a positive dy moves it down; uncovered pixels are 0.
    The flip comes first: ``out[r, c] = src[r - dy, c - dx]`` with ``src`` the (flipped) image.
    """
    params = params.to(x.device)
    flip = params[:, 0].bool()
    shift = params[:, 1:]
    t = int(shift.abs().max()) if shift.numel() else 0
    if t == 0:
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x) if flip.any() else x
    # one gather from the zero-padded batch: source row r - dy + t, and source column c - dx + t,
    # or (flipped) w - 1 - (c - dx) + t; a shift of at most t stays inside the padding
    n, c, h, w = x.shape
    padded = F.pad(x, (t, t, t, t)).flatten(2)  # (N, C, (H+2t)(W+2t))
    rows = torch.arange(h, device=x.device).view(1, h) + t - shift[:, 1:2]  # (N, H)
    cols = torch.arange(w, device=x.device).view(1, w) - shift[:, 0:1]  # (N, W): c - dx
    cols = torch.where(flip.view(-1, 1), w - 1 - cols, cols) + t
    index = (rows.unsqueeze(2) * (w + 2 * t) + cols.unsqueeze(1)).view(n, 1, h * w)
    return padded.gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, rank, stream): reproducible and resumable
    without saving RNG state, and independent across ranks and uses."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1))
    return g


ALL_VIEWS = "all"


BANK_SEED = 0  # fixed, like the split seed: runs with different seeds share one bank (and one teacher cache)


class ViewBank:
    """A fixed set of ``k`` views per image, drawn once from a seed.

    Distillation draws each training view from the bank: at every step, for the sample with
    dataset index ``i``, an integer ``j`` in ``[0, k)`` comes from the step generator and the
    view is ``bank.params(i, j)``. Because the bank is a pure function of (spec, number of
    images, k, seed), the teacher's output for every view a run can ever ask for is known in
    advance, and can be computed once and cached (``cqkd.distill.cache``).

    With ``k >= spec.num_views`` (or ``k="all"``) every image gets every view, stored once as
    ``spec.enumerate()``, and drawing ``j`` uniformly gives exactly the distribution of
    ``ViewSpec.sample``. With a smaller ``k``, each image gets ``k`` *distinct* views chosen
    uniformly at random without replacement.
    """

    def __init__(self, spec: ViewSpec, num_images: int, k: int | str = 8, seed: int = 0) -> None:
        if num_images < 1:
            raise CqkdError(f"a view bank needs at least one image, got {num_images}")
        self.spec = spec
        self.num_images = num_images
        self.seed = seed
        self.views = spec.enumerate()  # (V, 3)
        v = len(self.views)
        if k == ALL_VIEWS:
            k = v
        if not isinstance(k, int) or k < 1:
            raise CqkdError(f"views per image must be a positive integer or 'all', got {k!r}")
        self.k = min(k, v)
        self.table: torch.Tensor | None = None  # (N, k, 3) int16, None when every image has every view
        if self.k < v:
            self.table = self._draw(num_images, self.k, seed)

    def _draw(self, n: int, k: int, seed: int, chunk: int = 65536) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        v = len(self.views)
        out = torch.empty(n, k, 3, dtype=torch.int16)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            choice = torch.rand(stop - start, v, generator=g).argsort(dim=1)[:, :k]
            out[start:stop] = self.views[choice].to(torch.int16)
        return out

    def all_params(self) -> torch.Tensor:
        """Every image's views as an int64 tensor (N, k, 3)."""
        if self.table is None:
            return self.views.unsqueeze(0).expand(self.num_images, -1, -1)
        return self.table.long()

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Which of its ``k`` views each of ``n`` samples gets: int64 (n,) on CPU."""
        return torch.randint(0, self.k, (n,), generator=generator)

    def params(self, index: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """(flip, dx, dy) of view ``which[i]`` of image ``index[i]``: int64 (n, 3) on CPU."""
        index, which = index.cpu(), which.cpu()
        if self.table is None:
            return self.views[which]
        return self.table[index, which].long()
