"""synth `--dedup`: drop candidates that copy a training image, judged in a fixed pixel space.

The distance and the copy rule are evaluate's memorisation ones (`metrics.NearestReal`, `metrics.is_copy`);
only the feature space and the threshold's floor are dedup's own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from augment_gan.errors import UserError
from augment_gan.features import pixel_extractor
from augment_gan.metrics import NearestReal

DEDUP_SIZE = 16
"""Side of the pixel feature (`features.pixel_extractor`): ignores the high-frequency noise G adds."""
DEDUP_PERCENTILE = 1.0
DEDUP_MIN_THRESHOLD = 2.0 / 255.0
"""A candidate this close (RMS in [-1, 1] units: one grey level) is a copy even if the real set's own
1st-percentile distance is 0 because it holds duplicates."""
DEDUP_FEATURE = f"pixels {DEDUP_SIZE}x{DEDUP_SIZE}, RMS difference in [-1, 1]"


class DedupIndex:
    """Distances from images to their nearest training image, in 16×16 pixel space.

    Feature: the image in [-1, 1] area-downsampled to 16×16, distance = RMS pixel difference. A memorised
    copy is a pixel-level near-duplicate; downsampling ignores the high-frequency noise G adds, and the
    measure does not depend on how far D has trained (D's features move during training and are trained
    to ignore the augmentations we apply to reals), so one threshold rule works for every checkpoint.
    Threshold: the `percentile` (1st) of real-to-real nearest-neighbour distances, at least one grey level.
    """

    def __init__(self, real: Any, percentile: float = DEDUP_PERCENTILE):
        if len(real) < 2:
            raise UserError("--dedup needs at least 2 training images to calibrate its threshold")
        self.embed = pixel_extractor(DEDUP_SIZE).embed  # uint8 N×C×H×W -> float N×(C·16·16)
        self.index = NearestReal(self.embed(real), percentile, floor=DEDUP_MIN_THRESHOLD)
        self.percentile, self.threshold = percentile, self.index.threshold

    def distances(self, images: Any) -> Any:
        """uint8 N×C×H×W -> float N: distance to the nearest training image."""
        return self.index.nearest(self.embed(images))[0]

    def is_copy(self, distance: float) -> bool:
        return bool(self.index.is_copy(distance))


def load_dedup_index(ckpt: Any, root: Path, progress: bool) -> DedupIndex:
    """Read the training folder the way `fit` read it and build the index."""
    from augment_gan.data import ReadOptions, load_folder
    from augment_gan.pixels import hwc_to_nchw

    images = load_folder(root, ReadOptions.from_checkpoint(ckpt), progress=progress)
    return DedupIndex(hwc_to_nchw(images.images))


def dedup_root(ckpt: Any, dedup_real: str | None) -> Path:
    """The training images `--dedup` compares against: `dedup_real`, else the folder the checkpoint records."""
    if dedup_real is not None:
        root = Path(dedup_real)
        if not root.is_dir():
            raise UserError(f"--dedup-real: folder not found: {root}")
        return root.resolve()
    recorded = ckpt.meta.data.root
    if not recorded:
        raise UserError("--dedup needs the training images: the checkpoint records no folder, pass --dedup-real DIR")
    if not Path(recorded).is_dir():
        raise UserError(f"--dedup needs the training images: {recorded} (recorded in the checkpoint) no longer "
                        "exists; pass --dedup-real DIR")
    return Path(recorded)
