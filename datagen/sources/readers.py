"""Where source photos come from: an FFHQ-wild download (:mod:`datagen.sources.ffhq_wild`), an
img2dataset collection (:mod:`datagen.sources.img2dataset`) or a plain folder of images
(:mod:`datagen.sources.image_folder`); :func:`open_source` picks the reader for a root.

A source lists its items from metadata alone (nothing is decoded here): each :class:`SourceItem`
carries its path, its sample key, its provenance, its duplicate group and its split.

What a source lists, its duplicates and its held-out split: :mod:`datagen.sources.items`.
"""

from __future__ import annotations

import os

from datagen import storage
from datagen.sources.ffhq_wild import METADATA_FILE, FFHQWildSource
from datagen.sources.image_folder import ImageFolderSource
from datagen.sources.img2dataset import Img2DatasetSource, has_tars
from datagen.sources.items import SourceError


def open_source(root: str | os.PathLike, test_size: int | None = None
                ) -> FFHQWildSource | Img2DatasetSource | ImageFolderSource:
    """An FFHQ-wild source if ``root/ffhq-dataset-v2.json`` exists, an img2dataset collection if
    ``root`` holds ``*.tar`` files, else an image folder."""
    root = storage.path(root)
    if not root.exists():
        raise SourceError(f"{root}: source folder not found")
    if not root.is_dir():
        raise SourceError(f"{root}: source is not a folder")
    if (root / METADATA_FILE).is_file():
        return FFHQWildSource(root, test_size=test_size)
    if has_tars(root):
        return Img2DatasetSource(root, test_size=test_size)
    return ImageFolderSource(root, test_size=test_size)
