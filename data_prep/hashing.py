"""Content and perceptual hashes, and a fast near-duplicate search.

- ``bytes_hash``: sha256 of the file bytes (byte-identical copies).
- ``pixel_hash``: sha256 of the decoded pixels and their shape (same image, re-encoded).
- ``dhash64`` / ``phash64``: 64-bit perceptual hashes (difference hash, DCT hash) of a
  greyscale thumbnail; near-duplicate candidates are pairs within a small Hamming
  distance of both.
- ``structure_similarity``: candidates are confirmed by the correlation of high-pass
  filtered 64x64 thumbnails. Hashes alone are not enough: chest X-rays of different
  children share their global layout and collide in 64-bit hashes (measured on the Kaggle
  chest set: candidate pairs of different patients reach low-pass thumbnail correlations
  of 0.97 but high-pass correlations below 0.55, while re-windowed copies and adjacent
  slices in the brain set score 0.6 to 1.0).
- Mirrored and rotated copies: ``transform_hashes`` hashes the eight flips and 90-degree
  rotations of an image (``TRANSFORMS``), and ``near_duplicate_pairs_transformed``
  compares each image's transformed hashes with every image's plain hashes, so a mirrored
  copy is found as fast as a plain one (hashes are compared, never pixel arrays).
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import PIL.Image
import scipy.fft
from scipy import ndimage

THUMB = 64  # side of the structure thumbnail
STRUCTURE_THRESHOLD = 0.6
# The flips and 90-degree rotations of an image (the dihedral group of the square), as numpy
# names them: "rot90" is np.rot90 (counter-clockwise), "fliplr" a left-right mirror,
# "transpose" a mirror about the main diagonal, "antitranspose" about the other diagonal.
TRANSFORMS = (
    "identity",
    "fliplr",
    "flipud",
    "rot90",
    "rot180",
    "rot270",
    "transpose",
    "antitranspose",
)
IDENTITY_ONLY = ("identity",)


def bytes_hash(data: bytes) -> str:
    """sha256 hex digest of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def pixel_hash(pixels: np.ndarray) -> str:
    """sha256 of decoded uint8 pixels, including the shape (greyscale collapsed already)."""
    h = hashlib.sha256(repr(pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def apply_transform(pixels: np.ndarray, name: str) -> np.ndarray:
    """One of ``TRANSFORMS`` applied to the first two axes of an array (a view when possible)."""
    if name == "identity":
        return pixels
    if name == "fliplr":
        return pixels[:, ::-1]
    if name == "flipud":
        return pixels[::-1]
    if name in ("rot90", "rot180", "rot270"):
        return np.rot90(pixels, {"rot90": 1, "rot180": 2, "rot270": 3}[name], axes=(0, 1))
    if name == "transpose":
        return np.swapaxes(pixels, 0, 1)
    if name == "antitranspose":
        return np.swapaxes(pixels, 0, 1)[::-1, ::-1]
    raise ValueError(f"unknown transform {name!r}; expected one of {TRANSFORMS}")


_PROBE = np.arange(6).reshape(2, 3)  # every transform of it is distinct


def _identify(arr: np.ndarray) -> str:
    for t in TRANSFORMS:
        cand = apply_transform(_PROBE, t)
        if cand.shape == arr.shape and np.array_equal(cand, arr):
            return t
    raise AssertionError("not a transform of the probe")


@functools.cache
def compose(first: str, then: str) -> str:
    """The transform equal to applying ``first``, then ``then``."""
    return _identify(apply_transform(apply_transform(_PROBE, first), then))


@functools.cache
def inverse(name: str) -> str:
    """The transform that undoes ``name``."""
    return next(t for t in TRANSFORMS if compose(name, t) == "identity")


HASH_SOURCE = 128  # perceptual hashes of transforms are taken from a grey copy this size


def transform_hashes(
    pixels: np.ndarray, transforms: tuple[str, ...] = TRANSFORMS
) -> dict[str, list]:
    """Pixel, dHash and pHash of each transform of an image, in the order of ``transforms``.

    ``pixel[k] == pixel_hash(apply_transform(pixels, transforms[k]))``. The perceptual
    hashes of the identity are those of the image; those of the other transforms are taken
    from a greyscale copy whose longer side is at most ``HASH_SOURCE`` (exact for smaller
    images, within a bit or two of the transformed image's own hashes for larger ones),
    so that eight transforms cost little more than one.
    """
    out: dict[str, list] = {"pixel": [], "dhash": [], "phash": []}
    grey = _grey(pixels)
    if max(grey.size) > HASH_SOURCE:
        scale = HASH_SOURCE / max(grey.size)
        size = (max(1, round(grey.size[0] * scale)), max(1, round(grey.size[1] * scale)))
        small = np.asarray(grey.resize(size, PIL.Image.Resampling.BILINEAR))
    else:
        small = np.asarray(grey)
    for t in transforms:
        px = np.ascontiguousarray(apply_transform(pixels, t))
        out["pixel"].append(pixel_hash(px))
        src = px if t == "identity" else np.ascontiguousarray(apply_transform(small, t))
        out["dhash"].append(dhash64(src))
        out["phash"].append(phash64(src))
    return out


def _grey(pixels: np.ndarray) -> PIL.Image.Image:
    if pixels.ndim == 3:
        pixels = np.round(pixels.astype(np.float32).mean(-1)).astype(np.uint8)
    return PIL.Image.fromarray(pixels)


def _bits_to_int(bits: np.ndarray) -> int:
    return int(np.packbits(bits.astype(np.uint8).ravel()).view(">u8")[0])


def dhash64(pixels: np.ndarray) -> int:
    """Difference hash: 9x8 thumbnail, one bit per horizontal gradient sign."""
    small = np.asarray(_grey(pixels).resize((9, 8), PIL.Image.Resampling.BILINEAR), dtype=np.int16)
    return _bits_to_int(small[:, 1:] > small[:, :-1])


def phash64(pixels: np.ndarray) -> int:
    """DCT hash: 32x32 thumbnail, 8x8 low frequencies compared with their median."""
    small = np.asarray(
        _grey(pixels).resize((32, 32), PIL.Image.Resampling.BILINEAR), dtype=np.float32
    )
    low = scipy.fft.dctn(small, norm="ortho")[:8, :8].ravel()
    return _bits_to_int(low > np.median(low[1:]))


def thumbnail(pixels: np.ndarray) -> np.ndarray:
    """64x64 greyscale uint8 thumbnail (for structure_similarity)."""
    return np.asarray(
        _grey(pixels).resize((THUMB, THUMB), PIL.Image.Resampling.BILINEAR), dtype=np.uint8
    )


def structure_descriptor(thumb: np.ndarray) -> np.ndarray:
    """Unit-norm high-pass version of a thumbnail (float32, flattened)."""
    g = thumb.astype(np.float32)
    h = g - ndimage.gaussian_filter(g, 1.5)
    h -= h.mean()
    return (h / (np.linalg.norm(h) + 1e-6)).ravel()


def structure_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of the high-pass thumbnails of two images (1 = same structure)."""
    return float(structure_descriptor(a) @ structure_descriptor(b))


def adaptive_structure_threshold(
    thumbs: list[np.ndarray],
    *,
    sample: int = 400,
    seed: int = 0,
    floor: float = STRUCTURE_THRESHOLD,
    margin: float = 0.3,
    cap: float = 0.95,
) -> float:
    """A structure-similarity threshold that adapts to how alike a dataset's images are.

    ``min(cap, max(floor, p99 + margin))`` where p99 is the 99th percentile of the
    similarity of random image pairs. Real sets give the floor (Kaggle brain MRI p99 0.23,
    chest X-ray 0.30); synthetic phantoms, which share their layout, give up to the cap.
    """
    n = len(thumbs)
    if n < 20:
        return floor
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, size=min(n, sample), replace=False)
    d = np.stack([structure_descriptor(thumbs[i]) for i in idx])
    sims = (d @ d.T)[np.triu_indices(len(idx), 1)]
    return float(min(cap, max(floor, np.percentile(sims, 99) + margin)))


def hashes_to_bits(hashes: np.ndarray) -> np.ndarray:
    """uint64 (n,) -> bool (n, 64)."""
    h = np.asarray(hashes, dtype=np.uint64).astype(">u8")
    return np.unpackbits(h.view(np.uint8).reshape(-1, 8), axis=1).astype(bool)


def hamming_matrix(a_bits: np.ndarray, b_bits: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two sets of 64-bit hashes, int32 (na, nb)."""
    a = a_bits.astype(np.float32)
    b = b_bits.astype(np.float32)
    ones = a.sum(1)[:, None] + b.sum(1)[None, :]
    return np.rint(ones - 2.0 * (a @ b.T)).astype(np.int32)


def near_duplicate_pairs(
    dhashes: np.ndarray,
    phashes: np.ndarray,
    *,
    dhash_threshold: int = 8,
    phash_threshold: int = 8,
    chunk: int = 1024,
    thumbs: list[np.ndarray] | None = None,
    structure_threshold: float = STRUCTURE_THRESHOLD,
) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose dHash AND pHash are both within their thresholds and,
    when ``thumbs`` are given, whose structure similarity reaches ``structure_threshold``.

    Uses a chunked popcount over XORed hashes: 7,000 images take about a second.
    """
    found = near_duplicate_pairs_transformed(
        np.asarray(dhashes, np.uint64)[:, None],
        np.asarray(phashes, np.uint64)[:, None],
        IDENTITY_ONLY,
        dhash_threshold=dhash_threshold,
        phash_threshold=phash_threshold,
        chunk=chunk,
        thumbs=thumbs,
        structure_threshold=structure_threshold,
    )
    return [(i, j) for i, j, _, _ in found]


def near_duplicate_pairs_transformed(
    dhashes: np.ndarray,
    phashes: np.ndarray,
    transforms: tuple[str, ...] = TRANSFORMS,
    *,
    dhash_threshold: int = 8,
    phash_threshold: int = 8,
    chunk: int = 1024,
    thumbs: list[np.ndarray] | None = None,
    structure_threshold: float = STRUCTURE_THRESHOLD,
) -> list[tuple[int, int, str, float]]:
    """Near-duplicate pairs, mirrored and rotated copies included.

    ``dhashes``/``phashes``: uint64 (n, len(transforms)), column k the hash of image i
    under ``transforms[k]`` (column 0 must be "identity"; see ``transform_hashes``).
    Returns ``(i, j, t, similarity)`` with i < j, meaning ``t(image_i)`` is a near copy of
    ``image_j``; one row per pair, the identity when it matches, else the transform with
    the highest structure similarity (1.0 for every pair when ``thumbs`` is None).
    """
    dh, ph = np.asarray(dhashes, np.uint64), np.asarray(phashes, np.uint64)
    if transforms[0] != "identity" or dh.shape[1] != len(transforms):
        raise ValueError("hash columns must follow transforms, identity first")
    best: dict[tuple[int, int], tuple[str, float]] = {}
    desc: dict[tuple[int, str], np.ndarray] = {}

    def d(i: int, t: str) -> np.ndarray:
        if (i, t) not in desc:
            desc[i, t] = structure_descriptor(np.ascontiguousarray(apply_transform(thumbs[i], t)))
        return desc[i, t]

    for k, t in enumerate(transforms):
        for i, j in _hash_pairs(
            dh[:, k],
            dh[:, 0],
            ph[:, k],
            ph[:, 0],
            dhash_threshold,
            phash_threshold,
            chunk,
            upper=k == 0,
        ):
            key, tt = ((i, j), t) if i < j else ((j, i), inverse(t))
            if key in best and best[key][0] == "identity":
                continue
            sim = 1.0 if thumbs is None else float(d(i, t) @ d(j, "identity"))
            if sim < structure_threshold:
                continue
            if key not in best or t == "identity" or sim > best[key][1]:
                best[key] = (tt, sim)
    return [(i, j, t, s) for (i, j), (t, s) in sorted(best.items())]


def transformed_matches(
    query_dhashes: np.ndarray,
    query_phashes: np.ndarray,
    ref_dhashes: np.ndarray,
    ref_phashes: np.ndarray,
    query_thumbs: list[np.ndarray],
    ref_thumbs: list[np.ndarray],
    transforms: tuple[str, ...] = TRANSFORMS,
    *,
    dhash_threshold: int = 8,
    phash_threshold: int = 8,
    structure_threshold: float = 0.9,
    chunk: int = 1024,
) -> list[tuple[int, int, str, float]]:
    """Every ``(i, j, t, similarity)`` where ``t(query_i)`` is a near copy of ``ref_j``.

    Query hashes are (n, len(transforms)) as ``transform_hashes`` gives them; reference
    hashes (m,) are the plain ones. Two different sets: no pair is left out as a self-pair.
    """
    qd, qp = np.asarray(query_dhashes, np.uint64), np.asarray(query_phashes, np.uint64)
    rd, rp = np.asarray(ref_dhashes, np.uint64), np.asarray(ref_phashes, np.uint64)
    out = []
    ref_desc: dict[int, np.ndarray] = {}
    for k, t in enumerate(transforms):
        pairs = _hash_pairs(
            qd[:, k], rd, qp[:, k], rp, dhash_threshold, phash_threshold, chunk, None
        )
        for i, j in pairs:
            if j not in ref_desc:
                ref_desc[j] = structure_descriptor(ref_thumbs[j])
            q = structure_descriptor(np.ascontiguousarray(apply_transform(query_thumbs[i], t)))
            sim = float(q @ ref_desc[j])
            if sim >= structure_threshold:
                out.append((i, j, t, sim))
    return out


def _popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between uint64 hashes a (m,) and b (n,): int (m, n)."""
    x = a[:, None] ^ b[None, :]
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return hamming_matrix(hashes_to_bits(a), hashes_to_bits(b))


def _hash_pairs(dq, dr, pq, pr, dhash_threshold, phash_threshold, chunk, upper):
    """(i, j), i != j, with query hashes i within both thresholds of reference hashes j
    (only j > i when ``upper``; every (i, j) when ``upper`` is None: two different sets)."""
    n = len(dq)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        ii, jj = np.nonzero(_popcount_xor(dq[start:stop], dr) <= dhash_threshold)
        ii = ii + start
        if upper is not None:
            keep = jj > ii if upper else jj != ii
            ii, jj = ii[keep], jj[keep]
        if len(ii) == 0:
            continue
        pd = (
            np.bitwise_count(pq[ii] ^ pr[jj])
            if hasattr(np, "bitwise_count")
            else (hashes_to_bits(pq[ii]) != hashes_to_bits(pr[jj])).sum(1)
        )
        ok = pd <= phash_threshold
        pairs.extend(zip(ii[ok].tolist(), jj[ok].tolist()))
    return pairs


def groups_from_pairs(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components (size >= 2) of an undirected graph, as sorted index lists."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted((sorted(c) for c in comps.values() if len(c) > 1), key=lambda c: c[0])
