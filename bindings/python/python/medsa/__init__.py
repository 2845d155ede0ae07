"""medsa: the Medical SAM Adapter engine from Python.

A thin layer over the Rust engine (``medsa._medsa``): the same checkpoint loading, presets,
propagation and NIfTI handling as the ``medsa-engine`` command line, with numpy arrays in and
out. Arrays are passed to the engine without a copy when they are already float32 and laid out
as the engine reads them; results are numpy arrays that own the engine's buffers.

Array conventions (those of nibabel and MONAI):

* a volume is indexed ``[x, y, z]`` (voxel indices ``i, j, k`` of the NIfTI file), shape
  ``(nx, ny, nz)``, optionally with a leading channel axis of size 1; prompts give voxel indices
  ``(x, y, z)``;
* an image is ``(H, W)`` grey or ``(H, W, 3)`` RGB with intensities on 0..255; prompts give
  ``(x, y)`` = (column, row).

Prompts are one object or a list of objects (object k is label k + 1 in the mask)::

    {"box": [x0, y0, x1, y1]}                       # 2D
    {"box": [x0, y0, z0, x1, y1, z1]}               # 3D: every slice z0..z1, or bounds a walk
    {"points": [[x, y, label], ...]}                # 2D clicks, label 1 adds, 0 removes
    {"points": [[x, y, z, label], ...]}             # 3D clicks
    {"box": [...], "interactions": [{"points": [[x, y, z, label]]}]}   # refine a propagation
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np

from . import _medsa
from . import metrics
from ._medsa import Embeddings, Header, MedsaError

__all__ = [
    "Model",
    "Embeddings",
    "Header",
    "MedsaError",
    "read_nifti",
    "write_nifti",
    "metrics",
    "__version__",
]

__version__ = _medsa.version()


def _f32(a: Any, what: str) -> np.ndarray:
    """``a`` as a C-contiguous float32 array (no copy when it already is one)."""
    try:
        arr = np.ascontiguousarray(a, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise MedsaError(f"{what}: expected a numeric array ({e})") from None
    return arr


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _progress_callback(progress: Any) -> Optional[Callable[[int, int], None]]:
    """``progress``: a callable ``(done, total)``, True for a tqdm bar (if tqdm is installed),
    or None/False for nothing."""
    if progress is None or progress is False:
        return None
    if callable(progress):
        return progress
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    bar = {}

    def tell(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, unit="slice", desc="medsa")
        b = bar["bar"]
        b.update(done - b.n)
        if done >= total:
            b.close()

    return tell


class Model:
    """A SAM / LiteMedSAM / Med-SA checkpoint, optionally with a trained adapter, on a device.

    ``Model(checkpoint, adapter=None, device="cpu", precision="f32")``: ``checkpoint`` is a
    ``.safetensors`` model (``medsa-engine convert`` makes one from an official ``.pth``),
    ``adapter`` the tensors ``medsa-engine train`` wrote, ``device`` ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``, ``precision`` ``"f32"`` or ``"bf16"``. Raises :class:`MedsaError` with the
    engine's message when a file is missing, corrupt or does not match.
    """

    def __init__(
        self,
        checkpoint: Union[str, "os.PathLike[str]"],
        adapter: Optional[Union[str, "os.PathLike[str]"]] = None,
        device: str = "cpu",
        precision: str = "f32",
        allow_base_mismatch: bool = False,
    ) -> None:
        self._m = _medsa.Model(
            str(checkpoint),
            None if adapter is None else str(adapter),
            device,
            precision,
            allow_base_mismatch,
        )
        self._info = json.loads(self._m.info_json())

    @property
    def info(self) -> dict:
        """What was loaded and how it is fed: variant, image size, embedding shape, device,
        precision, the presets and intensity window its metadata records, and so on."""
        return dict(self._info)

    @property
    def image_size(self) -> Tuple[int, int]:
        """The model input ``(H, W)``."""
        return self._m.image_size

    def __repr__(self) -> str:
        i = self._info
        return f"medsa.Model({i['variant']}, {i['image_size'][0]}px, {i['device']})"

    def embed(
        self, images: Any, depth: Optional[int] = None, depth_mode: Optional[str] = None
    ) -> Embeddings:
        """Encodes preprocessed images ``(B, 3, H, W)`` (or one ``(3, H, W)``) at the model
        input size. With ``depth``, every ``depth`` consecutive images are one volume chunk for
        the SD-Trans depth branch (``depth_mode``: ``"compat"`` or ``"per_token"``, default the
        model's). The embeddings stay on the model's device; see :meth:`embeddings_array`."""
        x = _f32(images, "images")
        if x.ndim == 3:
            x = x[None]
        return self._m.embed(x, depth, depth_mode)

    def embeddings_array(self, emb: Embeddings) -> np.ndarray:
        """The embeddings as a float32 array ``(B, C, h, w)``."""
        return self._m.embeddings_array(emb)

    def decode(
        self,
        embeddings: Embeddings,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask: bool = False,
        classes: Optional[int] = None,
        input_size: Optional[Tuple[int, int]] = None,
        original_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decodes prompts against ``embeddings`` (sample b against image b), coordinates in
        model-input pixels: ``points`` ``(B, N, 2)`` with ``labels`` ``(B, N)`` (1 foreground,
        0 background, -1 ignored), ``boxes`` ``(B, 4)``, ``mask_input`` ``(B, 1, 4h, 4w)``
        logits. Returns ``(masks, iou, low_res_logits)``: mask logits ``(B, M, H0, W0)`` at
        ``original_size`` (SAM's postprocessing: crop to ``input_size``, resize), predicted IoU
        ``(B, M)`` and the low-resolution logits ``(B, M, 4h, 4w)``. Threshold logits at 0."""
        if (points is None) != (labels is None):
            raise MedsaError("decode: points and labels go together")
        conv = lambda a, w: None if a is None else _f32(a, w)  # noqa: E731
        return self._m.decode(
            embeddings,
            conv(points, "points"),
            conv(labels, "labels"),
            conv(boxes, "boxes"),
            conv(mask_input, "mask_input"),
            multimask,
            classes,
            None if input_size is None else tuple(input_size),
            None if original_size is None else tuple(original_size),
        )

    def segment(
        self,
        x: Any,
        prompts: Union[dict, Sequence[dict]],
        *,
        propagate: Union[bool, dict] = False,
        multimask: bool = False,
        preset: Optional[str] = None,
        intensity: Optional[str] = None,
        chunk: Optional[int] = None,
        probabilities: bool = False,
        progress: Any = None,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Segments an image or a volume from prompts, as ``medsa-engine segment`` does.

        ``x``: a grey image ``(H, W)`` when it has two dimensions, else a volume ``(nx, ny, nz)``
        or ``(1, nx, ny, nz)`` (an RGB image goes to :meth:`segment_image`). Preprocessing (``preset``: ``"sam"``, ``"medsa"``,
        ``"litemedsam"``) and the volume intensity window (``intensity``: ``"ct"``, ``"mr"``,
        ``"window:lo,hi"``, ...) default to what the model's metadata records. ``propagate``
        (volumes): True, or a dict of rule fields (``margin``, ``min_area``, ``min_iou``,
        ``min_stability``, ``max_slices``, ``mask_input``), segments each object through the
        volume from one prompted slice. Returns the uint8 label map in ``x``'s shape (object k
        is label k + 1), and with ``probabilities`` also the float32 maximum probability.
        """
        a = np.asarray(x)
        if a.ndim == 2:
            return self.segment_image(
                a, prompts, multimask=multimask, preset=preset, probabilities=probabilities
            )
        return self.segment_volume(
            a,
            prompts,
            propagate=propagate,
            multimask=multimask,
            preset=preset,
            intensity=intensity,
            chunk=chunk,
            probabilities=probabilities,
            progress=progress,
        )

    def segment_image(
        self,
        image: Any,
        prompts: Union[dict, Sequence[dict]],
        *,
        multimask: bool = False,
        preset: Optional[str] = None,
        probabilities: bool = False,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Segments a 2D image ``(H, W)`` or ``(H, W, 3)`` on 0..255 (see :meth:`segment`)."""
        a = np.asarray(image)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] != 3:
            raise MedsaError(f"image: expected (H, W) or (H, W, 3), got shape {a.shape}")
        opts = {"preset": preset, "multimask": multimask}
        labels, prob = self._m.segment_image(
            _f32(a, "image"), json.dumps(_jsonable(prompts)), json.dumps(opts)
        )
        return (labels, prob) if probabilities else labels

    def segment_volume(
        self,
        volume: Any,
        prompts: Union[dict, Sequence[dict]],
        *,
        propagate: Union[bool, dict] = False,
        multimask: bool = False,
        preset: Optional[str] = None,
        intensity: Optional[str] = None,
        chunk: Optional[int] = None,
        probabilities: bool = False,
        progress: Any = None,
    ) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """Segments a volume ``(nx, ny, nz)`` or ``(1, nx, ny, nz)`` (see :meth:`segment`).
        ``progress``: a callable ``(slices_encoded, nz)`` or True for a tqdm bar."""
        a = np.asarray(volume)
        channel = a.ndim == 4
        if channel:
            if a.shape[0] != 1:
                raise MedsaError(
                    f"volume: a 4D array must have one channel first, got shape {a.shape}"
                )
            a = a[0]
        if a.ndim != 3:
            raise MedsaError(f"volume: expected (nx, ny, nz), got shape {a.shape}")
        # The engine reads x fastest: that is the transpose of (nx, ny, nz) in C order, which
        # an F-ordered array (nibabel's, read_nifti's) already is, so no copy.
        zyx = _f32(a.T, "volume")
        opts = {
            "volume_preset": preset,
            "intensity": intensity,
            "chunk": chunk,
            "multimask": multimask,
            "propagate": _jsonable(propagate),
            "probabilities": probabilities,
        }
        labels, prob = self._m.segment_volume(
            zyx,
            json.dumps(_jsonable(prompts)),
            json.dumps(opts),
            _progress_callback(progress),
        )
        fix = (lambda v: v.T[None]) if channel else (lambda v: v.T)
        return (fix(labels), fix(prob)) if probabilities else fix(labels)


def read_nifti(path: Union[str, "os.PathLike[str]"]) -> Tuple[np.ndarray, Header]:
    """Reads a NIfTI-1 volume (``.nii`` / ``.nii.gz``, any stored dtype, scaled by its slope and
    intercept): a float32 array ``(nx, ny, nz)`` (Fortran-ordered, no copy) and its
    :class:`Header`, which :func:`write_nifti` takes to write a mask on the same grid."""
    zyx, header = _medsa.read_nifti(str(path))
    return zyx.T, header


def write_nifti(
    path: Union[str, "os.PathLike[str]"], data: Any, like: Header
) -> None:
    """Writes ``data`` ``(nx, ny, nz)`` on ``like``'s grid (dims, pixdim, qform/sform and codes
    kept), atomically: uint8 and bool arrays as labels, anything else as float32."""
    a = np.asarray(data)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    dtype = np.uint8 if a.dtype in (np.uint8, np.bool_) else np.float32
    zyx = np.ascontiguousarray(a.T, dtype=dtype)
    _medsa.write_nifti(str(path), zyx, like)

