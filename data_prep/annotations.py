"""Lesion annotations in, masks out: read YOLO, VIA, COCO or mask-image annotations and
rasterise them at the source image's resolution.

Formats (``data_prep.build --annotations=PATH --annotation_format=...``):

- ``yolo``: one ``.txt`` per image, in a tree under PATH that mirrors the images
  (``ROOT/labels/<class>/<name>.txt`` for ``ROOT/images/<class>/<name>.jpg``) or beside
  each image. Lines ``class x_center y_center width height`` relative to the image size
  (a line of 7 or more odd-count numbers, ``class x1 y1 x2 y2 ...``, is a YOLO polygon).
  ``classes.txt`` (labelImg) is ignored. An empty file: an image without lesion.
- ``via``: a VGG Image Annotator JSON export (dict keyed by ``filename+size``, or a VIA
  project file holding ``_via_img_metadata``); ``regions`` a list or a dict; shapes
  ``polygon``, ``polyline``, ``rect``, ``circle``, ``ellipse`` (optional ``theta``, radians,
  clockwise on screen as VIA draws it) and ``point``.
- ``coco``: a COCO JSON file: ``images`` (``id``, ``file_name``, optional ``width``/
  ``height``, the size the coordinates refer to) and ``annotations`` (``image_id``,
  ``segmentation`` as polygons or RLE, compressed or not, decoded by pycocotools; else
  ``bbox`` ``[x, y, width, height]``). An image listed without annotations has no lesion.
- ``masks``: mask images, ``<stem>_mask.<ext>`` beside the image or in a tree under PATH
  mirroring the images (``<stem>.<ext>`` or ``<stem>_mask.<ext>``); any non-zero pixel is
  lesion. A mask must have the image's size.

Several regions of one image are united. An image the annotations name with no region gets
an empty mask (a negative); an image they do not name is *unknown* (no mask, never scored).

Geometry: pixel (x, y) covers [x, x + 1) x [y, y + 1). Filled shapes (polygon, rect,
circle, ellipse, a polyline whose ends meet) take the pixels whose centre lies inside; an
open polyline takes the pixels its 1-pixel line touches; a point takes the pixel holding it.
A region inside the image that covers no pixel centre still marks the pixel at its centre.

Bad input raises ``AnnotationError`` with one line ``FILE: ENTRY: problem``: a malformed
file or entry, an entry naming an image that is not there, a region outside the image (no
overlap, or reaching more than ``MAX_OVERHANG`` of the image side beyond an edge: coordinates
for another image size; a smaller overhang, as an ellipse drawn round a tumour at the edge,
is clipped).
"""

from __future__ import annotations

import collections
import json
import math
import os
import urllib.parse
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
from scipy import ndimage

from data_prep import image_io, layouts

FORMATS = ("yolo", "via", "coco", "masks")
VIA_SHAPES = ("polygon", "polyline", "rect", "circle", "ellipse", "point")
MAX_OVERHANG = 0.25  # of the image side: further beyond an edge is an error
YOLO_IGNORED = ("classes.txt",)


class AnnotationError(ValueError):
    """One bad annotation: ``FILE: ENTRY: problem`` on one line."""

    def __init__(self, file: str, entry: str, problem: str, image: str | None = None):
        super().__init__(f"{file}: {entry}: {problem}" if entry else f"{file}: {problem}")
        self.file, self.entry, self.problem = file, entry, problem
        self.image = image  # the relpath of the image it concerns (made unknown), if any


@dataclass(frozen=True)
class ImageRef:
    """An image of the dataset, as the annotations need it."""

    relpath: str  # relative to --src, '/'-separated (the prepared example's id)
    path: str  # absolute path
    width: int
    height: int
    file_size: int = 0


@dataclass
class Annotation:
    """What the annotations say about one image."""

    source: str  # "FILE: ENTRY", for messages
    regions: list[dict[str, Any]] = field(default_factory=list)  # {"name": shape, ...}
    frame: tuple[int, int] | None = None  # (h, w) the coordinates refer to (None: the image's)
    mask_path: str | None = None  # masks format
    mask_regions: int = 0  # masks format and borrowed masks: connected components
    # A borrowed mask (data_prep.borrow): returns a bool mask, resized to the image's size.
    mask_loader: Callable[[], np.ndarray] | None = None

    @property
    def n_regions(self) -> int:
        return self.mask_regions if self.mask_path or self.mask_loader else len(self.regions)


@dataclass
class AnnotationSet:
    """Annotations of a dataset's images; an image absent from ``by_image`` is unknown."""

    format: str
    path: str
    by_image: dict[str, Annotation]
    errors: list[AnnotationError]


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class AnnotationSource:
    """Where a build's annotations come from, known before the images are scanned."""

    format: str
    path: str  # the JSON file or the folder; '' = beside the images
    src: str
    image_root: str  # src, or src/images for the yolo layout

    def excludes(self, f: layouts.RawFile) -> bool:
        """True for files of the image tree that are annotations, not images."""
        path = os.path.abspath(f.path)
        if self.path and _under(path, self.path) and self.path != self.image_root:
            return True
        if self.format == "yolo":
            return path.lower().endswith(".txt")
        if self.format == "masks":
            return os.path.splitext(os.path.basename(path))[0].endswith("_mask")
        return False

    def load(self, images: Sequence[ImageRef]) -> AnnotationSet:
        """Reads the annotations of ``images``; bad entries land in ``errors``."""
        loader = {"yolo": _load_yolo, "via": _load_via, "coco": _load_coco, "masks": _load_masks}
        by_image, errors = loader[self.format](self, list(images))
        bad = {e.image for e in errors if e.image}
        by_image = {k: v for k, v in by_image.items() if k not in bad}
        return AnnotationSet(self.format, self.path, by_image, errors)

    def key(self, im: ImageRef) -> str:
        """The image's path relative to the image root, without extension."""
        rel = os.path.relpath(im.path, self.image_root).replace(os.sep, "/")
        return os.path.splitext(rel)[0]


def source_for(
    annotation_format: str, path: str, src: str, dataset: str
) -> AnnotationSource | None:
    """Resolves the flags (``auto`` format, the yolo layout's ``labels/``); None: none given."""
    src = os.path.abspath(src)
    image_root = os.path.join(src, layouts.YOLO_IMAGES) if dataset == "yolo" else src
    if not path and dataset == "yolo":
        path = os.path.join(src, layouts.YOLO_LABELS)
        path = path if os.path.isdir(path) else ""
        annotation_format = annotation_format if annotation_format != "auto" else "yolo"
    if not path and annotation_format in ("auto", "none", ""):
        return None
    if path:
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--annotations={path} does not exist")
    if annotation_format == "auto":
        annotation_format = detect_format(path)
    if annotation_format not in FORMATS:
        raise ValueError(f"--annotation_format must be one of {FORMATS}, got {annotation_format!r}")
    if annotation_format in ("via", "coco") and not os.path.isfile(path):
        raise ValueError(f"--annotation_format={annotation_format} needs a JSON file: {path!r}")
    if annotation_format in ("yolo", "masks") and path and not os.path.isdir(path):
        raise ValueError(f"--annotation_format={annotation_format} needs a folder: {path!r}")
    return AnnotationSource(annotation_format, path, src, image_root)


def detect_format(path: str) -> str:
    """via, coco (a JSON file), yolo (a folder of .txt) or masks (a folder of images)."""
    if os.path.isfile(path):
        data = _read_json(path)
        return "coco" if isinstance(data, dict) and "images" in data else "via"
    for _, _, names in os.walk(path):
        for n in names:
            if n.lower().endswith(".txt"):
                return "yolo"
            if image_io.is_image_name(n):
                return "masks"
    raise ValueError(f"cannot tell the annotation format of {path}: pass --annotation_format")


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"line {e.lineno}", f"malformed JSON ({e.msg})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(path, "", f"unreadable ({e})") from e


# ----------------------------------------------------------------------------- regions
def _num(v: Any, what: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not a number: {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} is not finite: {v!r}")
    return x


def _nums(v: Any, what: str) -> list[float]:
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{what} must be a list of numbers, got {type(v).__name__}")
    return [_num(x, what) for x in v]


def via_region(shape: Any) -> dict[str, Any]:
    """A VIA ``shape_attributes`` dict -> a region; ValueError names what is wrong."""
    if not isinstance(shape, dict) or "name" not in shape:
        raise ValueError("shape_attributes without a 'name'")
    name = shape["name"]
    need = {
        "polygon": ("all_points_x", "all_points_y"),
        "polyline": ("all_points_x", "all_points_y"),
        "rect": ("x", "y", "width", "height"),
        "circle": ("cx", "cy", "r"),
        "ellipse": ("cx", "cy", "rx", "ry"),
        "point": ("cx", "cy"),
    }
    if name not in need:
        raise ValueError(f"unknown shape {name!r} (expected one of {', '.join(VIA_SHAPES)})")
    missing = [k for k in need[name] if k not in shape]
    if missing:
        raise ValueError(f"{name} without {', '.join(missing)}")
    if name in ("polygon", "polyline"):
        xs, ys = _nums(shape["all_points_x"], "all_points_x"), _nums(shape["all_points_y"], "y")
        if len(xs) != len(ys):
            raise ValueError(f"{name} has {len(xs)} x but {len(ys)} y coordinates")
        return {"name": name, "x": xs, "y": ys}
    out: dict[str, Any] = {"name": name}
    out.update({k: _num(shape[k], k) for k in need[name]})
    if name == "ellipse":
        out["theta"] = _num(shape.get("theta", 0.0) or 0.0, "theta")
    return out


def region_bbox(r: dict[str, Any]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a region, in the pixels of its frame."""
    n = r["name"]
    if n in ("polygon", "polyline"):
        return min(r["x"]), min(r["y"]), max(r["x"]), max(r["y"])
    if n == "rect":
        return r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]
    if n == "circle":
        return r["cx"] - r["r"], r["cy"] - r["r"], r["cx"] + r["r"], r["cy"] + r["r"]
    if n == "ellipse":
        c, s = abs(math.cos(r["theta"])), abs(math.sin(r["theta"]))
        hx = math.hypot(r["rx"] * c, r["ry"] * s)
        hy = math.hypot(r["rx"] * s, r["ry"] * c)
        return r["cx"] - hx, r["cy"] - hy, r["cx"] + hx, r["cy"] + hy
    if n == "point":
        return r["cx"], r["cy"], r["cx"], r["cy"]
    if n == "coco":
        return r["bbox"]
    raise ValueError(f"unknown region {n!r}")


def check_region(r: dict[str, Any], width: int, height: int) -> str | None:
    """What is wrong with a region on a width x height frame, or None."""
    n = r["name"]
    sizes = {"rect": ("width", "height"), "circle": ("r",), "ellipse": ("rx", "ry")}
    bad = [k for k in sizes.get(n, ()) if r[k] <= 0]
    if bad:
        return f"{n} with {', '.join(f'{k} {r[k]:g}' for k in bad)} (must be > 0)"
    if n in ("polygon", "polyline") and len(r["x"]) < (3 if n == "polygon" else 2):
        return f"{n} with {len(r['x'])} point(s)"
    x0, y0, x1, y1 = region_bbox(r)
    where = f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
    if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
        return f"{n} lies outside the {width}x{height} image ({where})"
    over = max(-x0 / width, -y0 / height, (x1 - width) / width, (y1 - height) / height)
    if over > MAX_OVERHANG:
        return (
            f"{n} reaches {over:.0%} of the image side beyond the {width}x{height} image "
            f"({where}): coordinates for another image size?"
        )
    return None


def rasterise(ann: Annotation, height: int, width: int) -> np.ndarray:
    """The union of an annotation's regions: bool (height, width), the image's resolution."""
    if ann.mask_path:
        return read_mask(ann.mask_path)
    if ann.mask_loader is not None:
        return resize_mask(ann.mask_loader(), (height, width))
    fh, fw = ann.frame or (height, width)
    mask = np.zeros((fh, fw), bool)
    for r in ann.regions:
        mask |= draw_region(r, fh, fw)
    if (fh, fw) != (height, width):
        mask = resize_mask(mask, (height, width))
    return mask


def draw_region(r: dict[str, Any], height: int, width: int) -> np.ndarray:
    """One region as a bool (height, width) mask (see the module docstring's geometry)."""
    n = r["name"]
    if n == "coco":
        m = _coco_mask(r["segmentation"], height, width)
    elif n == "point":
        m = np.zeros((height, width), bool)
    elif n == "polyline" and math.dist((r["x"][0], r["y"][0]), (r["x"][-1], r["y"][-1])) > 1:
        m = _line(r["x"], r["y"], height, width)
    else:
        m = _filled(r, height, width)
    if not m.any() and not r.get("rle"):  # a sub-pixel region or a point: its centre pixel
        x0, y0, x1, y1 = region_bbox(r)
        cx = min(width - 1, max(0, math.floor((x0 + x1) / 2)))
        cy = min(height - 1, max(0, math.floor((y0 + y1) / 2)))
        m[cy, cx] = True
    return m


def _filled(r: dict[str, Any], height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside a polygon, rect, circle or ellipse."""
    m = np.zeros((height, width), bool)
    x0, y0, x1, y1 = region_bbox(r)
    c0, c1 = max(0, math.floor(x0)), min(width, math.ceil(x1) + 1)
    r0, r1 = max(0, math.floor(y0)), min(height, math.ceil(y1) + 1)
    if c0 >= c1 or r0 >= r1:
        return m
    px, py = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
    n = r["name"]
    if n == "rect":
        inside = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
    elif n in ("circle", "ellipse"):
        rx, ry = (r["r"], r["r"]) if n == "circle" else (r["rx"], r["ry"])
        c, s = (1.0, 0.0) if n == "circle" else (math.cos(r["theta"]), math.sin(r["theta"]))
        dx, dy = px - r["cx"], py - r["cy"]
        u, v = dx * c + dy * s, -dx * s + dy * c
        inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    else:  # polygon, closed polyline: even-odd rule
        inside = _in_polygon(np.asarray(r["x"]), np.asarray(r["y"]), px, py)
    m[r0:r1, c0:c1] = inside
    return m


def _in_polygon(xs: np.ndarray, ys: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    inside = np.zeros(px.shape, bool)
    j = len(xs) - 1
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(len(xs)):
            xi, yi, xj, yj = xs[i], ys[i], xs[j], ys[j]
            crosses = (yi > py) != (yj > py)
            x_at = (xj - xi) * (py - yi) / (yj - yi) + xi
            inside ^= crosses & (px < x_at)
            j = i
    return inside


def _line(xs: Sequence[float], ys: Sequence[float], height: int, width: int) -> np.ndarray:
    img = PIL.Image.new("1", (width, height), 0)
    pts = [(x - 0.5, y - 0.5) for x, y in zip(xs, ys)]
    PIL.ImageDraw.Draw(img).line(pts, fill=1, width=1)
    return np.asarray(img, bool)


def _coco_mask(seg: Any, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils  # COCO's reference RLE and polygon code

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {
            "size": seg["size"],
            "counts": counts.encode() if isinstance(counts, str) else counts,
        }
    with warnings.catch_warnings():  # pycocotools' own numpy-2 deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), bool)


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resizes a bool mask by area (a pixel is lesion when at least half of it is); a
    non-empty mask stays non-empty (its best-covered pixel survives)."""
    h, w = hw
    if mask.shape == (h, w):
        return mask.astype(bool)
    cover = np.asarray(
        PIL.Image.fromarray(mask.astype(np.float32), mode="F").resize(
            (w, h), PIL.Image.Resampling.BOX
        )
    )
    out = cover >= 0.5
    if mask.any() and not out.any():
        out[np.unravel_index(int(np.argmax(cover)), cover.shape)] = True
    return out


def read_mask(path: str) -> np.ndarray:
    """A mask image -> bool (H, W): any non-zero pixel value (any colour channel, alpha
    ignored; palette images by index) is lesion. Raises OSError or PIL's errors."""
    with PIL.Image.open(path) as img:
        img.load()
        mode = img.mode
        if mode in ("1", "L", "P", "I", "F") or mode.startswith("I;16"):
            return np.asarray(img) != 0
        if mode == "LA":
            return np.asarray(img)[..., 0] != 0
        rgb = (
            np.asarray(img)[..., :3] if mode in ("RGBA", "RGBa") else np.asarray(img.convert("RGB"))
        )
        return rgb.any(axis=-1)


# ----------------------------------------------------------------------------- loaders
class _ImageIndex:
    """Finds the image a VIA/COCO entry names: by path, else by file name (+ file size)."""

    def __init__(self, images: Sequence[ImageRef], source: AnnotationSource):
        self.src = source.src
        self.by_name: dict[str, list[ImageRef]] = collections.defaultdict(list)
        for im in images:
            self.by_name[os.path.basename(im.relpath)].append(im)

    def find(self, file: str, where: str, name: Any, size: Any = None) -> ImageRef:
        if not isinstance(name, str) or not name:
            raise AnnotationError(file, where, f"no file name ({name!r})")
        clean = urllib.parse.unquote(urllib.parse.urlparse(name).path) if "://" in name else name
        clean = clean.replace("\\", "/")
        cands = self.by_name.get(os.path.basename(clean), [])
        parts = [p for p in clean.split("/") if p not in ("", ".")]
        for k in range(len(parts), 1, -1):  # the longest matching tail of the path wins
            tail = "/".join(parts[-k:])
            exact = [c for c in cands if c.relpath == tail or c.relpath.endswith("/" + tail)]
            if exact:
                cands = exact
                break
        if len(cands) > 1 and size not in (None, ""):
            cands = [c for c in cands if str(c.file_size) == str(size)] or cands
        if not cands:
            raise AnnotationError(
                file, where, f"names {name!r}, which is not an image of {self.src}"
            )
        if len(cands) > 1:
            names = ", ".join(c.relpath for c in cands[:3])
            raise AnnotationError(file, where, f"{name!r} matches several images ({names})")
        return cands[0]


def _orphans(folder: str, claimed: set[str], wanted, image_root: str) -> list[AnnotationError]:
    """Annotation files under ``folder`` that no image claimed."""
    out = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for n in sorted(names):
            p = os.path.abspath(os.path.join(root, n))
            if not n.startswith(".") and wanted(n) and p not in claimed:
                out.append(AnnotationError(p, "", f"annotates no image of {image_root}"))
    return out


def _load_yolo(source: AnnotationSource, images: list[ImageRef]):
    by_image: dict[str, Annotation] = {}
    errors: list[AnnotationError] = []
    claimed: set[str] = set()
    for im in images:
        cands = [os.path.join(source.path, source.key(im) + ".txt")] if source.path else []
        cands.append(os.path.splitext(im.path)[0] + ".txt")
        label = next((c for c in cands if os.path.isfile(c)), None)
        if label is None:
            continue  # unknown
        claimed.add(os.path.abspath(label))
        try:
            by_image[im.relpath] = Annotation(source=label, regions=_parse_yolo(label, im))
        except AnnotationError as e:
            errors.append(e)
    if source.path:
        wanted = lambda n: n.lower().endswith(".txt") and n not in YOLO_IGNORED  # noqa: E731
        errors += _orphans(source.path, claimed, wanted, source.image_root)
    return by_image, errors


def _parse_yolo(label: str, im: ImageRef) -> list[dict[str, Any]]:
    """The regions of one YOLO label file, in pixels of the image."""
    try:
        with open(label, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(label, "", f"unreadable ({e})", im.relpath) from e
    w, h = im.width, im.height
    regions = []
    for k, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            vals = [_num(x, "field") for x in fields]
        except ValueError:
            msg = f"not numbers: {line.strip()!r}"
            raise AnnotationError(label, f"line {k}", msg, im.relpath) from None
        if vals[0] < 0 or vals[0] != int(vals[0]):
            raise AnnotationError(label, f"line {k}", f"class id {fields[0]!r}", im.relpath)
        if len(vals) == 5:
            xc, yc, bw, bh = vals[1:]
            r = {"name": "rect", "x": (xc - bw / 2) * w, "y": (yc - bh / 2) * h}
            r.update(width=bw * w, height=bh * h)
        elif len(vals) >= 7 and len(vals) % 2 == 1:
            r = {
                "name": "polygon",
                "x": [v * w for v in vals[1::2]],
                "y": [v * h for v in vals[2::2]],
            }
        else:
            raise AnnotationError(
                label,
                f"line {k}",
                f"{len(fields)} fields; expected 'class x_center y_center width height' "
                "(relative) or a polygon 'class x1 y1 x2 y2 x3 y3 ...'",
                im.relpath,
            )
        problem = check_region(r, w, h)
        if problem:
            raise AnnotationError(label, f"line {k}", problem, im.relpath)
        r["class"] = int(vals[0])
        regions.append(r)
    return regions


def _load_json_export(source: AnnotationSource, images: list[ImageRef], unwrap, expected, entries):
    """The JSON formats' frame: the file's export as `unwrap` finds it (None: not this format,
    `expected` says what is), then `entries(path, export, index) -> (by_image, errors)`.
    An unreadable or malformed file, or another format, is the one error."""
    path = source.path
    try:
        data = unwrap(_read_json(path))
    except AnnotationError as e:
        return {}, [e]
    if data is None:
        return {}, [AnnotationError(path, "top level", expected)]
    return entries(path, data, _ImageIndex(images, source))


def _via_export(data: Any) -> dict | None:
    if isinstance(data, dict) and isinstance(data.get("_via_img_metadata"), dict):
        data = data["_via_img_metadata"]  # a VIA project file
    return data if isinstance(data, dict) else None


def _load_via(source: AnnotationSource, images: list[ImageRef]):
    expected = "not a VIA export (an object keyed by filename+size)"
    return _load_json_export(source, images, _via_export, expected, _via_entries)


def _via_entries(path: str, data: dict, index: _ImageIndex):
    by_image: dict[str, Annotation] = {}
    errors: list[AnnotationError] = []
    for key, entry in data.items():
        try:
            im, regions = _via_entry(path, f"entry {key!r}", entry, index)
        except AnnotationError as e:
            errors.append(e)
            continue
        ann = by_image.setdefault(im.relpath, Annotation(source=f"{path}: entry {key!r}"))
        ann.regions.extend(regions)
    return by_image, errors


def _via_entry(path: str, where: str, entry: Any, index: _ImageIndex):
    if not isinstance(entry, dict) or "filename" not in entry:
        raise AnnotationError(path, where, "not a VIA image entry (no 'filename')")
    im = index.find(path, where, entry["filename"], entry.get("size"))
    regions = entry.get("regions")
    if isinstance(regions, dict):  # VIA 1.x: {"0": region, ...}
        regions = list(regions.values())
    if not isinstance(regions, list):
        raise AnnotationError(path, where, "'regions' must be a list or a dict", im.relpath)
    out = []
    for k, reg in enumerate(regions):
        try:
            r = via_region(reg.get("shape_attributes") if isinstance(reg, dict) else None)
        except ValueError as e:
            raise AnnotationError(path, f"{where} region {k}", str(e), im.relpath) from None
        problem = check_region(r, im.width, im.height)
        if problem:
            raise AnnotationError(path, f"{where} region {k}", problem, im.relpath)
        out.append(r)
    return im, out


def _coco_export(data: Any) -> dict | None:
    is_coco = (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations", []), list)
    )
    return data if is_coco else None


def _load_coco(source: AnnotationSource, images: list[ImageRef]):
    expected = "not COCO ('images' and 'annotations' lists)"
    return _load_json_export(source, images, _coco_export, expected, _coco_entries)


def _coco_entries(path: str, data: dict, index: _ImageIndex):
    by_image: dict[str, Annotation] = {}
    by_id: dict[Any, tuple[ImageRef, Annotation]] = {}
    listed: set[Any] = set()
    errors: list[AnnotationError] = []
    for k, e in enumerate(data["images"]):
        where = f"images[{k}]"
        try:
            if not isinstance(e, dict) or "id" not in e or "file_name" not in e:
                raise AnnotationError(path, where, "needs 'id' and 'file_name'")
            listed.add(e["id"])
            im = index.find(path, f"{where} (id {e['id']})", e["file_name"])
            ann = Annotation(source=f"{path}: {where}", frame=_coco_frame(path, where, e, im))
        except AnnotationError as err:
            errors.append(err)
            continue
        by_id[e["id"]] = (im, by_image.setdefault(im.relpath, ann))
    for k, a in enumerate(data.get("annotations", [])):
        where = f"annotations[{k}]"
        image_id = a.get("image_id") if isinstance(a, dict) else None
        if image_id not in by_id:
            if image_id not in listed:
                errors.append(
                    AnnotationError(path, where, f"image_id {image_id!r} is not in images")
                )
            continue  # its image entry was bad: reported already
        im, ann = by_id[image_id]
        try:
            ann.regions.append(_coco_region(path, where, a, im, ann.frame))
        except AnnotationError as err:
            errors.append(err)
    return by_image, errors


def _coco_frame(path: str, where: str, e: dict, im: ImageRef) -> tuple[int, int] | None:
    """The (h, w) a COCO image's coordinates refer to when it is not the image's own."""
    if "width" not in e or "height" not in e:
        return None
    try:
        h, w = int(e["height"]), int(e["width"])
    except (TypeError, ValueError):
        raise AnnotationError(path, where, "width/height are not integers", im.relpath) from None
    if h <= 0 or w <= 0:
        raise AnnotationError(path, where, f"size {w}x{h}", im.relpath)
    return None if (h, w) == (im.height, im.width) else (h, w)


def _coco_region(path: str, where: str, a: dict, im: ImageRef, frame) -> dict[str, Any]:
    fh, fw = frame or (im.height, im.width)
    seg, bbox = a.get("segmentation"), a.get("bbox")
    try:
        if seg:
            r = _coco_segmentation(seg, fh, fw)
        elif bbox is not None:
            vals = _nums(bbox, "bbox")
            if len(vals) != 4:
                raise ValueError(f"bbox has {len(vals)} numbers, expected [x, y, width, height]")
            r = {"name": "rect", "x": vals[0], "y": vals[1], "width": vals[2], "height": vals[3]}
        else:
            raise ValueError("neither 'segmentation' nor 'bbox'")
    except (ValueError, TypeError, KeyError) as e:
        raise AnnotationError(path, where, str(e), im.relpath) from None
    problem = check_region(r, fw, fh)
    if problem:
        raise AnnotationError(path, where, problem, im.relpath)
    return r


def _coco_segmentation(seg: Any, height: int, width: int) -> dict[str, Any]:
    """A COCO segmentation -> a region (checked: polygons' points, RLE size and decoding)."""
    if isinstance(seg, list):
        polys = [_nums(p, "polygon") for p in seg]
        if any(len(p) < 6 or len(p) % 2 for p in polys):
            raise ValueError("a polygon needs an even number (>= 6) of coordinates")
        xs = [v for p in polys for v in p[0::2]]
        ys = [v for p in polys for v in p[1::2]]
        return {"name": "coco", "segmentation": seg, "bbox": (min(xs), min(ys), max(xs), max(ys))}
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise ValueError("segmentation must be polygons or an RLE {'counts', 'size'}")
    if [int(v) for v in seg["size"]] != [height, width]:
        raise ValueError(
            f"RLE size {seg['size']} but the image is {width}x{height} (h, w expected)"
        )
    try:
        m = _coco_mask(seg, height, width)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"RLE does not decode ({e})") from None
    if m.shape != (height, width):
        raise ValueError(f"RLE decodes to {m.shape}, expected {(height, width)}")
    ys, xs = np.nonzero(m)
    box = (0.0, 0.0, float(width), float(height))
    if len(xs):
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    return {"name": "coco", "segmentation": seg, "bbox": box, "rle": True}


def _load_masks(source: AnnotationSource, images: list[ImageRef]):
    by_image: dict[str, Annotation] = {}
    errors: list[AnnotationError] = []
    claimed: set[str] = set()
    listing: dict[str, list[str]] = {}
    for im in images:
        mp = _find_mask(source, im, listing)
        if mp is None:
            continue  # unknown
        claimed.add(mp)
        try:
            m = read_mask(mp)
        except (OSError, ValueError, SyntaxError) as e:
            errors.append(AnnotationError(mp, "", f"unreadable mask ({e})", im.relpath))
            continue
        if m.shape != (im.height, im.width):
            msg = f"mask is {m.shape[1]}x{m.shape[0]} but {im.relpath} is {im.width}x{im.height}"
            errors.append(AnnotationError(mp, "", msg, im.relpath))
            continue
        n = int(ndimage.label(m)[1])
        by_image[im.relpath] = Annotation(source=mp, mask_path=mp, mask_regions=n)
    separate = source.path and source.path != source.image_root
    folder = source.path if separate else source.image_root
    if separate:
        wanted = image_io.is_image_name
    else:
        wanted = lambda n: _stem(n).endswith("_mask") and image_io.is_image_name(n)  # noqa: E731
    errors += _orphans(folder, claimed, wanted, source.image_root)
    return by_image, errors


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _find_mask(source: AnnotationSource, im: ImageRef, listing: dict) -> str | None:
    """``<stem>_mask.*`` beside the image, or ``<stem>.*`` / ``<stem>_mask.*`` in the tree."""
    stem = _stem(im.path)
    places = [(os.path.dirname(im.path), (stem + "_mask",))]
    if source.path:
        mirror = os.path.join(source.path, os.path.dirname(source.key(im)))
        places.insert(0, (mirror, (stem, stem + "_mask")))
    for folder, stems in places:
        if folder not in listing:
            names = os.listdir(folder) if os.path.isdir(folder) else []
            listing[folder] = sorted(n for n in names if image_io.is_image_name(n))
        for n in listing[folder]:
            p = os.path.abspath(os.path.join(folder, n))
            if _stem(n) in stems and p != os.path.abspath(im.path):
                return p
    return None


# ----------------------------------------------------------------------------- counts
def summarise(
    annotations: AnnotationSet, splits: dict[str, Sequence[str]], skipped: Sequence[str] = ()
) -> dict[str, Any]:
    """Counts for xmedjax_dataset.json and audit.md: images with lesion regions
    (``annotated``), annotated without any (``empty``: negatives), not annotated
    (``unknown``: never scored), regions per image, per split; ``skipped`` error lines."""

    def count(rels) -> dict[str, int]:
        c = collections.Counter()
        for rel in rels:
            a = annotations.by_image.get(rel)
            c["unknown" if a is None else "annotated" if a.n_regions else "empty"] += 1
        return {k: c[k] for k in ("annotated", "empty", "unknown")}

    images = sorted({r for rels in splits.values() for r in rels})
    per_image = collections.Counter(
        annotations.by_image[r].n_regions for r in images if r in annotations.by_image
    )
    return {
        "format": annotations.format,
        "path": annotations.path,
        **count(images),
        "regions": int(sum(k * v for k, v in per_image.items())),
        "regions_per_image": {str(k): per_image[k] for k in sorted(per_image)},
        "by_split": {s: count(rels) for s, rels in splits.items() if rels},
        "skipped": list(skipped),
    }


def markdown(summary: dict[str, Any]) -> str:
    """The annotations section of audit.md."""
    lines = [
        "## Annotations",
        "",
        f"`{summary['format']}` from `{summary['path'] or 'beside the images'}`: "
        f"{summary['annotated']} images with lesion regions, {summary['empty']} annotated "
        f"without any (negatives), {summary['unknown']} not annotated (unknown, never "
        f"scored); {summary['regions']} regions, per image {summary['regions_per_image']}.",
        "",
        "| split | annotated | empty | unknown |",
        "| --- | --- | --- | --- |",
    ]
    for s, c in summary["by_split"].items():
        lines.append(f"| {s} | {c['annotated']} | {c['empty']} | {c['unknown']} |")
    if "borrowed" in summary:
        from data_prep import borrow

        lines += ["", borrow.markdown(summary["borrowed"]).rstrip()]
    if summary["skipped"]:
        lines += ["", f"Skipped (--skip_bad), {len(summary['skipped'])}:", ""]
        lines += [f"- {e}" for e in summary["skipped"]]
    return "\n".join(lines) + "\n"
