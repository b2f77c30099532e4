"""Image preparation for the released layout, matching img2dataset's recipe flags used by the RealSyn authors:
`--image_size 224 --resize_mode keep_ratio --resize_only_if_bigger=True --skip_reencode=True` (encode_format jpg,
encode_quality 95). keep_ratio scales so the *shorter* side equals image_size; with resize_only_if_bigger an image
whose shorter side is already <= image_size is left alone; with skip_reencode a JPEG that needs no resize keeps its
original bytes. img2dataset resizes with OpenCV INTER_AREA when shrinking; PIL's BOX filter is the same area average.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

from PIL import Image


@dataclass
class Prepared:
    jpg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def prepare_image(data: bytes, image_size: int = 224, only_if_bigger: bool = True, skip_reencode: bool = True,
                  quality: int = 95) -> Prepared:
    """Raises ValueError for bytes that are not a decodable image (the caller counts it as decode_error)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()
            img = im.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"decode_error: {err}") from None
    w, h = img.size
    new: Optional[tuple[int, int]] = None
    if not only_if_bigger or min(w, h) > image_size:
        scale = image_size / min(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        if new == (w, h):
            new = None
    if new is None and skip_reencode and fmt == "JPEG":
        return Prepared(data, w, h, w, h)
    if new is not None:
        img = img.resize(new, Image.Resampling.BOX if new[0] < w else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Prepared(buf.getvalue(), img.size[0], img.size[1], w, h)
