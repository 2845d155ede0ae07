"""Type stubs of the compiled half of the package (``medsa._medsa``). Use the wrappers in
``medsa`` (``medsa.Model`` and friends); these are their building blocks."""

from typing import Callable, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

class MedsaError(RuntimeError):
    """An error reported by the engine; the message names the file, field or argument."""

class Embeddings:
    """Image embeddings on the model's device."""

    @property
    def shape(self) -> Tuple[int, int, int, int]: ...

class Header:
    """The geometry of a NIfTI file."""

    @property
    def dims(self) -> Tuple[int, int, int]: ...
    @property
    def spacing(self) -> Tuple[float, float, float]: ...
    @property
    def affine(self) -> List[List[float]]: ...
    @property
    def codes(self) -> Tuple[int, int]: ...

class Model:
    def __init__(
        self,
        checkpoint: str,
        adapter: Optional[str] = None,
        device: str = "cpu",
        precision: str = "f32",
        allow_base_mismatch: bool = False,
    ) -> None: ...
    def info_json(self) -> str: ...
    @property
    def image_size(self) -> Tuple[int, int]: ...
    def embed(
        self,
        images: npt.NDArray[np.float32],
        depth: Optional[int] = None,
        depth_mode: Optional[str] = None,
    ) -> Embeddings: ...
    def embeddings_array(self, emb: Embeddings) -> npt.NDArray[np.float32]: ...
    def decode(
        self,
        emb: Embeddings,
        points: Optional[npt.NDArray[np.float32]] = None,
        labels: Optional[npt.NDArray[np.float32]] = None,
        boxes: Optional[npt.NDArray[np.float32]] = None,
        mask_input: Optional[npt.NDArray[np.float32]] = None,
        multimask: bool = False,
        classes: Optional[int] = None,
        input_size: Optional[Tuple[int, int]] = None,
        original_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
    def segment_image(
        self, image: npt.NDArray[np.float32], prompts_json: str, options_json: str
    ) -> Tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
    def segment_volume(
        self,
        volume: npt.NDArray[np.float32],
        prompts_json: str,
        options_json: str,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Tuple[npt.NDArray[np.uint8], Optional[npt.NDArray[np.float32]]]: ...

def read_nifti(path: str) -> Tuple[npt.NDArray[np.float32], Header]: ...
def write_nifti(path: str, data: npt.NDArray, like: Header) -> None: ...
def scores(
    pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_], spacing: List[float]
) -> Tuple[float, float, float]: ...
def overlap(
    pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]
) -> Tuple[float, float]: ...
def version() -> str: ...
