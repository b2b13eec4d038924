"""Item images in zip archives (covers): decoding a member to RGB, and what to say when it cannot
be decoded. Preprocessing tries every item's image (`image_problem`) and stops on one that does
not decode, naming the item, the member, the archive and the config key
``dataset_sources.<name>.missing_images: blank``, under which the item gets a blank image as an
item without one does (`iisan.data.amazon.preprocess`). The readers (`open_image`: the caches,
the backbones in the training loop, the captions) name the same if one fails later."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from iisan.data.errors import DataError


class UndecodableImage(DataError):
    """An archive member that does not decode as an image (the message names the archive, the
    member, the item and the way out)."""


def _decode(data: bytes, *, quick: bool = False):
    """The image of `data`, loaded; `quick` decodes a JPEG at its smallest scale (every byte of
    it is still read, so a truncated or corrupt file fails as in a full decode)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if quick:
        img.draft("RGB", (1, 1))
    img.load()
    return img


def _why(data: bytes | None, err: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if data is not None and not data:
        return "it is empty (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return f"its {len(data or b'')} bytes are in no image format PIL recognises"
    return f"{type(err).__name__}: {err}"


def image_problem(zf: zipfile.ZipFile, member: str) -> str | None:
    """Why zip member `member` does not decode as an image (empty, unrecognised, truncated,
    corrupt, a bad CRC), or None. Decodes quickly (`_decode`): about 2 ms for a 500 x 500 JPEG."""
    data = None
    try:
        data = zf.read(member)
        _decode(data, quick=True)
    except MemoryError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError...; zipfile BadZipFile
        return _why(data, err)
    return None


def missing_images_key(dataset: str | None) -> str:
    """The config key that gives an item whose image is missing or undecodable a blank image."""
    return f"dataset_sources.{dataset or '<name>'}.missing_images: blank"


def undecodable(archive: str | Path, member: str, item, why: str, dataset: str | None = None, advice: str | None = None) -> str:
    """The message for item `item`'s image, member `member` of `archive`, that does not decode;
    `advice` (what to do) defaults to replacing it or the config key that blanks it."""
    advice = advice or (f"replace it in the archive, or set {missing_images_key(dataset)} in the config to give the item a "
                        "blank image, as an item without an image gets")
    return f"{archive}: the image of item {item!r} (member {member!r}) cannot be decoded ({why}); {advice}"


def open_image(zf: zipfile.ZipFile, member: str, archive: str | Path, item=None, dataset: str | None = None,
               advice: str | None = None):
    """Zip member `member` of `archive` (open as `zf`) as an RGB image; one that does not decode
    raises `UndecodableImage` naming the archive, the member, the item (by default the member's
    file stem, as preprocessing matches them) and `advice`, by default the config key that
    blanks it (the workflow's next run then preprocesses the dataset again, giving the item a
    blank image)."""
    data = None
    try:
        data = zf.read(member)
        return _decode(data).convert("RGB")
    except MemoryError:
        raise
    except Exception as err:
        item = Path(member).stem if item is None else item
        raise UndecodableImage(undecodable(archive, member, item, _why(data, err), dataset, advice)) from err
