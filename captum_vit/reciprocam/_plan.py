"""Which masked copies of which images one forward pass carries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Tuple

from .._utils import row_chunks


@dataclass(frozen=True)
class CopySelection:
    """The copies of each image in one forward pass.

    ``with_unmasked``: the block's own output (used for the prediction) comes
    first; ``cells``: grid cells whose masked copies follow, in that order.
    """

    with_unmasked: bool
    cells: Tuple[int, ...]

    @property
    def count(self) -> int:
        return int(self.with_unmasked) + len(self.cells)


def plan_copies(num_images: int, num_cells: int, copies_per_call: int) -> Iterator[Tuple[slice, CopySelection]]:
    """``(image rows, copies)`` per forward pass; every image's unmasked copy comes first.

    Whole images are grouped when their ``1 + num_cells`` copies fit, so
    every image runs the part of the model before the explained block once;
    an image whose copies do not fit is split into consecutive cell ranges,
    the first also carrying the unmasked copy.
    """
    per_image = num_cells + 1
    if copies_per_call >= per_image:
        for rows in row_chunks(num_images, copies_per_call // per_image):
            yield rows, CopySelection(with_unmasked=True, cells=tuple(range(num_cells)))
        return
    for b in range(num_images):
        for chunk in row_chunks(per_image, copies_per_call):  # copy j >= 1 is cell j - 1
            cells = tuple(range(max(chunk.start, 1) - 1, chunk.stop - 1))
            yield slice(b, b + 1), CopySelection(with_unmasked=chunk.start == 0, cells=cells)
