"""ShapeWorld: the embedded, procedurally rendered continual-learning stream.

Each image shows one object on a textured background; its caption names the object's shape,
colour, size, grid position and the background. There are five domains (``DOMAINS``), each with its
own four shapes, four colours, three backgrounds and caption template; size words (small/large) and
the nine position words are shared. Phase d of the stream trains on domain d's train split, and probe
d is domain d's probe split (disjoint ids), learned at phase d. The probe images are also classified
zero-shot by shape and by colour among their domain's class names (ZEROSHOT_TEMPLATES).

Held-out combinations: each domain holds a share (`novel_share`, default NOVEL_SHARE = 0.25: 216 of
864) of its attribute combinations out of training (`held_out`, a seeded function of (seed, domain)
alone; every shape, colour, size, position and background value still occurs in the rest). A
domain's train and probe splits draw only from the remaining ("seen") combinations; its novel split
draws only from the held-out ones, so its captions never occur in training. The stream measures both:
probe set "d0_basic" (ProbeSet.kind "seen") and "d0_basic/novel" (kind "novel"), each learned at
phase d. novel_share = 0 holds nothing out and renders VERSION 1's data.

Calibration split: each domain's calibration split ("d0_basic/calibration", kind "calibration",
`data.calibration_size` samples, default 512; 0 = none) is rendered like the probe split and draws
from the same seen combinations, under its own split id, so its samples are distinct from the probe
and train samples as those are from each other. It holds the pairs a realignment map is fitted on
(docs/definitions.md, "Calibration split"); the calibration sets follow every probe set in the stream.
Adding it changed no other sample (every sample is a function of its own split id).

The stream's reference set (ZSCL's distillation data) is the reference domain (REFERENCE_DOMAIN), rendered
apart from the five: each sample's shape, colour and background come from three different domains
and its caption has a template of its own, so no phase trains on it and no probe measures it; ids
disjoint from every other split. Its text pool (Stream.reference_texts) holds the captions of the
reference samples after the reference images, unpaired with them.

Determinism: sample ``(seed, domain, split, index)`` always renders the same pixels and caption,
whatever other samples are requested and in what order (for a given novel_share). The attribute
combination of sample ``i`` is ``pool[perm_b[i % n]]``, where ``pool`` holds the split's n
combinations (the seen ones, 648 of the 4*4*2*9*3 = 864 by default, or the held-out ones, 216) and
``perm_b`` is a seeded permutation of them for block ``b = i // n`` (each sample is uniform over the
pool; within a block no caption repeats, so a 200-image probe has 200 distinct captions; a probe
larger than its pool is refused). Continuous jitter (position, size, colour
brightness, texture phase) comes from a counter-based hash of (seed, domain, split, index, field).

Rendering is vectorised numpy: signed-distance functions evaluated on whole batches of coordinate
grids, with analytic anti-aliasing (coverage = clamp(0.5 - distance_in_pixels)).

Sample id = domain * 10**9 + split * 10**8 + index (split 0 = train, 1 = probe, 2 = reference,
3 = novel, 4 = calibration).

``python -m geomlab.data.shapes --preview FILE.html`` writes a grid of samples per domain.
"""
from __future__ import annotations

import argparse
import functools
import html
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import (CALIBRATION_KIND, CALIBRATION_SIZE, NOVEL_KIND, SEEN_KIND, Phase, ProbeSet, Stream, ZeroShotSet,
               calibration_name, register_stream)

TRAIN, PROBE, REFERENCE, NOVEL, CALIBRATION = 0, 1, 2, 3, 4
SPLITS = {"train": TRAIN, "probe": PROBE, "reference": REFERENCE, "novel": NOVEL, "calibration": CALIBRATION}
NOVEL_SHARE = 0.25              # share of each domain's attribute combinations held out of training
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
_SIZE_FRAC = (0.10, 0.15)       # object radius / image size
_GRID = (0.2, 0.5, 0.8)         # cell centres as a fraction of the image size
_JITTER = 0.03                  # position jitter (fraction of the image size)
VERSION = 2                     # bump when rendering changes (recorded in Stream.info); 2: held-out combinations
# Zero-shot prompts (docs/definitions.md, "Zero-shot classification"): CLIP's "a photo of a {}."
# wording, with the class name where the captions put it; one template per task.
ZEROSHOT_TEMPLATES = {"shape": ("a photo of a {}.",), "colour": ("a photo of a {} shape.",)}


# ----------------------------------------------------------------------------------------------
# Signed distance functions: unit ~ object radius, negative inside. x right, y up.

def _len(x, y):
    return np.sqrt(x * x + y * y)


def _box(x, y, bx, by):
    qx = np.abs(x) - bx
    qy = np.abs(y) - by
    return _len(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _star(x, y, r, n, m):
    """Inigo Quilez's sdStar: n points of circumradius r, first vertex up; m=2 -> regular n-gon."""
    an, en = math.pi / n, math.pi / m
    ac, asn = math.cos(an), math.sin(an)
    ec, es = math.cos(en), math.sin(en)
    bn = np.mod(np.arctan2(x, y), 2 * an) - an
    ln = _len(x, y)
    px = ln * np.cos(bn) - r * ac
    py = ln * np.abs(np.sin(bn)) - r * asn
    t = np.clip(-(px * ec + py * es), 0, r * asn / es)
    px = px + ec * t
    py = py + es * t
    return _len(px, py) * np.sign(px)


def _rot45(x, y):
    c = math.sqrt(0.5)
    return c * (x - y), c * (x + y)


def _circle(x, y):
    return _len(x, y) - 0.95


def _square(x, y):
    return _box(x, y, 0.8, 0.8)


def _triangle(x, y):
    return _star(x, y + 0.2, 1.15, 3, 2)


def _star5(x, y):
    return _star(x, y + 0.05, 1.1, 5, 3.2)


def _hexagon(x, y):
    return _star(x, y, 1.0, 6, 2)


def _plus(x, y):
    return np.minimum(_box(x, y, 0.95, 0.3), _box(x, y, 0.3, 0.95))


def _cross(x, y):
    return _plus(*_rot45(x, y))


def _ring(x, y):
    return np.abs(_len(x, y) - 0.7) - 0.28


def _diamond(x, y):
    return _star(x / 0.7, y, 1.05, 4, 2) * 0.7


def _heart(x, y):
    s = 1.7
    px, py = np.abs(x) / s, (y + 0.95) / s
    upper = _len(px - 0.25, py - 0.75) - math.sqrt(2) / 4
    k = 0.5 * np.maximum(px + py, 0)
    lower = np.sqrt(np.minimum((px ** 2 + (py - 1) ** 2), (px - k) ** 2 + (py - k) ** 2)) * np.sign(px - py)
    return np.where(px + py > 1, upper, lower) * s


def _crescent(x, y):
    return np.maximum(_len(x, y) - 0.95, -(_len(x - 0.5, y - 0.15) - 0.8))


def _arrow(x, y):
    shaft = _box(x + 0.35, y, 0.6, 0.26)
    head = _star(-y, x - 0.25, 0.72, 3, 2)
    return np.minimum(shaft, head)


def _pentagon(x, y):
    return _star(x, y + 0.05, 1.0, 5, 2)


def _oval(x, y):
    a, b = 1.0, 0.55
    k0 = _len(x / a, y / b)
    k1 = _len(x / (a * a), y / (b * b))
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _bar(x, y):
    return _box(x, y, 1.0, 0.32)


def _semicircle(x, y):
    y = y + 0.45
    return np.maximum(_len(x, y) - 1.05, -y)


def _chevron(x, y):
    return np.maximum(_triangle(x, y), -_triangle(x, y + 0.7))


def _bowtie(x, y):
    left = _star(-y, x + 0.5, 0.6, 3, 2)     # points right, towards the centre
    right = _star(y, -(x - 0.5), 0.6, 3, 2)  # points left
    return np.minimum(left, right)


def _frame(x, y):
    return np.maximum(_box(x, y, 0.85, 0.85), -_box(x, y, 0.5, 0.5))


def _octagon(x, y):
    return _star(x, y, 1.0, 8, 2)


# ----------------------------------------------------------------------------------------------
# Backgrounds: (kind, colour a, colour b). Texture weight t in {0..1} blends a -> b.

@dataclass(frozen=True)
class Background:
    name: str
    kind: str     # solid | hstripes | vstripes | dstripes | checker | vgrad | hgrad | dots | grid
    a: tuple
    b: tuple = (0, 0, 0)


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    shapes: tuple            # ((name, sdf), ...) x4
    colours: tuple           # ((name, (r, g, b)), ...) x4
    backgrounds: tuple       # (Background, ...) x3
    template: str            # str.format with size, colour, shape, pos, bg

    @property
    def shape_names(self):
        return tuple(s for s, _ in self.shapes)

    @property
    def colour_names(self):
        return tuple(c for c, _ in self.colours)

    @property
    def background_names(self):
        return tuple(b.name for b in self.backgrounds)

    @property
    def n_combinations(self):
        return len(self.shapes) * len(self.colours) * len(SIZES) * len(POSITIONS) * len(self.backgrounds)


DOMAINS: tuple[Domain, ...] = (
    Domain(
        "d0_basic", "primary colours, basic shapes, plain backgrounds",
        (("circle", _circle), ("square", _square), ("triangle", _triangle), ("star", _star5)),
        (("red", (220, 40, 40)), ("green", (40, 170, 60)), ("blue", (40, 80, 225)), ("yellow", (240, 210, 30))),
        (Background("grey", "solid", (128, 128, 128)), Background("white", "solid", (238, 238, 238)),
         Background("black", "solid", (28, 28, 28))),
        "a {size} {colour} {shape} at the {pos} on a {bg} background"),
    Domain(
        "d1_neon", "neon colours on dark textures",
        (("hexagon", _hexagon), ("cross", _cross), ("ring", _ring), ("diamond", _diamond)),
        (("magenta", (235, 40, 205)), ("cyan", (40, 225, 235)), ("lime", (165, 245, 40)), ("orange", (250, 140, 20))),
        (Background("striped", "hstripes", (18, 18, 40), (55, 55, 95)),
         Background("checkered", "checker", (22, 22, 22), (70, 70, 70)),
         Background("gradient", "vgrad", (10, 10, 70), (70, 10, 60))),
        "{size} {colour} {shape}, {pos}, {bg} backdrop"),
    Domain(
        "d2_pastel", "pastel colours on muted walls",
        (("heart", _heart), ("crescent", _crescent), ("arrow", _arrow), ("pentagon", _pentagon)),
        (("pink", (250, 165, 190)), ("lavender", (185, 160, 240)), ("mint", (150, 235, 190)), ("peach", (250, 200, 140))),
        (Background("polka dots", "dots", (70, 58, 82), (115, 100, 130)),
         Background("a slate wall", "solid", (58, 68, 90)),
         Background("diagonal lines", "dstripes", (38, 52, 44), (78, 96, 84))),
        "picture of a {colour} {shape}, {size}, located {pos}, with {bg}"),
    Domain(
        "d3_earth", "earth tones on bright scenes",
        (("oval", _oval), ("bar", _bar), ("semicircle", _semicircle), ("chevron", _chevron)),
        (("brown", (135, 80, 35)), ("olive", (115, 130, 30)), ("maroon", (125, 20, 45)), ("navy", (20, 35, 110))),
        (Background("sandy", "solid", (232, 214, 172)),
         Background("sky", "vgrad", (245, 248, 255), (140, 195, 240)),
         Background("tiled", "checker", (232, 224, 205), (196, 186, 165))),
        "{bg} scene with one {size} {shape} colored {colour} near the {pos}"),
    Domain(
        "d4_jewel", "jewel tones on dark patterns",
        (("plus", _plus), ("bowtie", _bowtie), ("frame", _frame), ("octagon", _octagon)),
        (("teal", (0, 160, 150)), ("purple", (135, 55, 200)), ("gold", (225, 180, 30)), ("silver", (205, 205, 215))),
        (Background("charcoal", "solid", (45, 45, 50)),
         Background("vertical bars", "vstripes", (22, 30, 30), (62, 70, 70)),
         Background("a grid", "grid", (28, 28, 34), (85, 85, 98))),
        "{shape} in {colour} ({size}) positioned {pos} over {bg}"),
)
DOMAIN_NAMES = tuple(d.name for d in DOMAINS)

# The reference domain (ZSCL's distillation data, docs/definitions.md "ZSCL loss"): rendered apart
# from the five streamed domains, as ZSCL's reference images and captions come from other data sets.
# A reference sample takes its shape, its colour and its background from three DIFFERENT domains
# (sizes and positions as everywhere), so its attribute combination is none of any domain's (no
# phase trains on it, no probe measures it), and its caption has a template of its own. Its number
# in sample ids and seeds is REFERENCE_ID: ids 9 * 10**9 + 2 * 10**8 + index, disjoint from every
# streamed domain's (0..4). Combination c (of 60 domain triples * 4*4*3 * 2 sizes * 9 positions =
# 51,840) is _REFERENCE_TRIPLES[c % 2880] (global shape, colour, background), size (c // 2880) % 2,
# position c // 5760; samples draw them as the domains do (a seeded permutation per block).
REFERENCE_ID = 9
REFERENCE_DOMAIN = Domain(
    "reference", "shape, colour and background each from a different domain",
    tuple(s for d in DOMAINS for s in d.shapes), tuple(c for d in DOMAINS for c in d.colours),
    tuple(b for d in DOMAINS for b in d.backgrounds),
    "one {colour} {shape} ({size}) drawn {pos} against {bg}")


def _reference_triples() -> np.ndarray:
    """[2880, 3] (shape, colour, background) indices into REFERENCE_DOMAIN's tuples, each of the
    three from a different domain."""
    first = lambda attr: np.cumsum([0] + [len(getattr(d, attr)) for d in DOMAINS])  # noqa: E731
    s0, c0, b0 = first("shapes"), first("colours"), first("backgrounds")
    return np.asarray([(s, c, b) for ds in range(len(DOMAINS)) for dc in range(len(DOMAINS))
                       for db in range(len(DOMAINS)) if len({ds, dc, db}) == 3
                       for s in range(s0[ds], s0[ds + 1]) for c in range(c0[dc], c0[dc + 1])
                       for b in range(b0[db], b0[db + 1])], np.int64)


_REFERENCE_TRIPLES = _reference_triples()


def _domain(domain: int) -> "Domain":
    return REFERENCE_DOMAIN if domain == REFERENCE_ID else DOMAINS[domain]


def reference_attributes(indices, seed: int = 0) -> dict:
    """Per-sample attributes of the reference domain's samples `indices` (as `attributes`; shape,
    colour and bg index REFERENCE_DOMAIN's tuples)."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= 10 ** 8):
        raise ValueError("sample indices must be in [0, 1e8)")
    n = len(_REFERENCE_TRIPLES)
    c = _combinations(seed, REFERENCE_ID, REFERENCE, idx,
                      np.arange(n * len(SIZES) * len(POSITIONS), dtype=np.int64))
    key = _key(seed, REFERENCE_ID, REFERENCE)
    u = [_uniform(key, idx, f) for f in range(6)]
    triple = _REFERENCE_TRIPLES[c % n]
    return {"shape": triple[:, 0], "colour": triple[:, 1], "size": (c // n) % len(SIZES),
            "pos": c // (n * len(SIZES)), "bg": triple[:, 2],
            "jx": (u[0] * 2 - 1) * _JITTER, "jy": (u[1] * 2 - 1) * _JITTER, "scale": 0.92 + 0.16 * u[2],
            "bright": 0.9 + 0.2 * u[3], "phase_x": u[4], "phase_y": u[5]}


def reference_texts(first: int, count: int, seed: int = 0) -> list[str]:
    """The reference text pool: captions of reference samples first .. first + count - 1 (the stream
    takes them after its reference images: texts unpaired with any image it uses)."""
    return captions_for(REFERENCE_ID, reference_attributes(np.arange(first, first + count), seed))


# ----------------------------------------------------------------------------------------------
# Counter-based randomness

_GOLD = np.uint64(0x9E3779B97F4A7C15)
_FIELD = np.uint64(0xD1B54A32D192ED69)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (uint64 arrays wrap silently)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _entropy(seed: int, domain: int, split: int, *extra: int) -> list[int]:
    return [int(seed) % 2 ** 64, int(domain), int(split), *map(int, extra)]


def _key(seed: int, domain: int, split: int) -> np.uint64:
    return np.random.SeedSequence(_entropy(seed, domain, split, 0x5A4E)).generate_state(1, np.uint64)[0]


def _uniform(key: np.uint64, idx: np.ndarray, field: int) -> np.ndarray:
    """U[0,1) float64 per index, a pure function of (key, index, field)."""
    off = np.uint64(((field + 1) * int(_FIELD) + int(key)) % 2 ** 64)
    z = _mix(idx.astype(np.uint64) * _GOLD + off)
    z = _mix(z ^ key)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 2 ** 53)


def _combinations(seed: int, domain: int, split: int, idx: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Sample i's combination: pool[perm_b[i % n]], perm_b a seeded permutation of the n = len(pool)
    combinations for block b = i // n (pool = every combination reproduces VERSION 1)."""
    n = len(pool)
    blocks = idx // n
    out = np.empty(len(idx), np.int64)
    for b in np.unique(blocks):
        g = np.random.Generator(np.random.Philox(np.random.SeedSequence(_entropy(seed, domain, split, b, 0xC0))))
        perm = g.permutation(n)
        sel = blocks == b
        out[sel] = pool[perm[idx[sel] % n]]
    return out


def _attribute_values(domain: Domain, c: np.ndarray) -> dict:
    """Attribute indices (shape, colour, size, pos, bg) of combination indices `c`."""
    ns, nc = len(domain.shapes), len(domain.colours)
    return {"shape": c % ns, "colour": (c // ns) % nc, "size": (c // (ns * nc)) % len(SIZES),
            "pos": (c // (ns * nc * len(SIZES))) % len(POSITIONS),
            "bg": (c // (ns * nc * len(SIZES) * len(POSITIONS))) % len(domain.backgrounds)}


def _check_share(share) -> float:
    if isinstance(share, bool) or not isinstance(share, (int, float, np.floating)) or not 0 <= share < 1:
        raise ValueError(f"data.shapes.novel_share must be a number in [0, 1), got {share!r}")
    return float(share)


def n_held_out(share: float = NOVEL_SHARE, n_combinations: int = 864) -> int:
    """How many of a domain's combinations `share` holds out: round(share * n_combinations)."""
    return int(math.floor(_check_share(share) * n_combinations + 0.5))


@functools.lru_cache(maxsize=64)
def _held_out(seed: int, domain: int, k: int) -> np.ndarray:
    d = DOMAINS[domain]
    n = d.n_combinations
    order = np.random.Generator(np.random.Philox(np.random.SeedSequence(
        _entropy(seed, domain, 0x401D, 0xC0)))).permutation(n)
    values = {key: v.tolist() for key, v in _attribute_values(d, order).items()}
    left = {key: np.bincount(v, minlength=max(v) + 1) for key, v in values.items()}  # combinations in training
    quota = {key: -(-k // len(c)) for key, c in left.items()}  # ceil(k / number of values)
    floor = {key: n // len(c) - quota[key] for key, c in left.items()}  # fewest left in training per value
    taken = np.zeros(n, bool)
    held: list[int] = []
    slack = 0
    while len(held) < k:
        before = len(held)
        for j in range(n):
            if len(held) == k:
                break
            # balanced: at most quota (+ slack) combinations held out per attribute value; and every
            # value keeps a combination in training
            if not taken[j] and all(c[values[key][j]] > max(1, floor[key] - slack) for key, c in left.items()):
                taken[j] = True
                held.append(int(order[j]))
                for key, c in left.items():
                    c[values[key][j]] -= 1
        if len(held) < k and len(held) == before and slack >= max(floor.values()):
            raise ValueError(f"data.shapes.novel_share holds out {k} of {n} combinations: too many to keep "
                             "every attribute value in training")
        slack += 1
    out = np.sort(np.asarray(held, np.int64))
    out.flags.writeable = False
    return out


def held_out(domain: int, seed: int = 0, share: float = NOVEL_SHARE) -> np.ndarray:
    """The sorted combination indices of `domain` held out of training (the novel split's pool):
    k = round(share * 864) combinations, taken in the order of a permutation seeded by (seed, domain)
    alone, skipping a combination that would hold out more than ceil(k / #values) combinations of one
    attribute value (a quota relaxed one step per pass until k are found: each shape, colour, size,
    position and background keeps close to its share of training) or leave a value without a
    combination in training."""
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain must be in [0, {len(DOMAINS)}), got {domain}")
    return _held_out(int(seed) % 2 ** 64, int(domain), n_held_out(share, DOMAINS[domain].n_combinations))


def combination_pool(domain: int, split, seed: int = 0, share: float = NOVEL_SHARE) -> np.ndarray:
    """The combinations `split` draws from: the held-out ones for the novel split, the rest (seen)
    for train, probe, calibration and reference."""
    held = held_out(domain, seed, share)
    if _split_id(split) == NOVEL:
        return held
    n = DOMAINS[domain].n_combinations
    return np.setdiff1d(np.arange(n, dtype=np.int64), held, assume_unique=True) if len(held) else np.arange(n)


def _split_id(split) -> int:
    if isinstance(split, str):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        return SPLITS[split]
    if split not in SPLITS.values():
        raise ValueError("split must be one of " + ", ".join(f"{i} ({n})" for n, i in SPLITS.items())
                         + f", got {split!r}")
    return int(split)


def sample_ids(domain: int, split, indices) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64)
    return domain * 10 ** 9 + _split_id(split) * 10 ** 8 + idx


# ----------------------------------------------------------------------------------------------
# Rendering

def attributes(domain: int, split, indices, seed: int = 0, novel_share: float = NOVEL_SHARE) -> dict:
    """Per-sample attribute indices (shape, colour, size, pos, bg) and jitter for `indices`; the
    combinations come from `combination_pool(domain, split, seed, novel_share)`. The reference
    domain (REFERENCE_ID, reference split only): `reference_attributes`."""
    if domain == REFERENCE_ID and _split_id(split) == REFERENCE:
        return reference_attributes(indices, seed)
    if not 0 <= domain < len(DOMAINS):
        raise ValueError(f"domain must be in [0, {len(DOMAINS)}), got {domain}")
    split = _split_id(split)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= 10 ** 8):
        raise ValueError("sample indices must be in [0, 1e8)")
    d = DOMAINS[domain]
    pool = combination_pool(domain, split, seed, novel_share)
    if not len(pool):
        raise ValueError(f"data.shapes.novel_share {novel_share!r} holds out no combination: no novel split")
    c = _combinations(seed, domain, split, idx, pool)
    key = _key(seed, domain, split)
    u = [_uniform(key, idx, f) for f in range(6)]
    attrs = {
        **_attribute_values(d, c),
        "jx": (u[0] * 2 - 1) * _JITTER,
        "jy": (u[1] * 2 - 1) * _JITTER,
        "scale": 0.92 + 0.16 * u[2],
        "bright": 0.9 + 0.2 * u[3],
        "phase_x": u[4],
        "phase_y": u[5],
    }
    return attrs


def captions_for(domain: int, attrs: dict) -> list[str]:
    d = _domain(domain)
    return [d.template.format(size=SIZES[sz], colour=d.colours[co][0], shape=d.shapes[sh][0],
                              pos=POSITIONS[p], bg=d.backgrounds[b].name)
            for sh, co, sz, p, b in zip(attrs["shape"].tolist(), attrs["colour"].tolist(),
                                        attrs["size"].tolist(), attrs["pos"].tolist(), attrs["bg"].tolist())]


def _texture(bg: Background, S: int, phx: np.ndarray, phy: np.ndarray, out: np.ndarray) -> None:
    """Write the [n, S, S, 3] float32 background of n samples into `out`."""
    a = np.asarray(bg.a, np.float32)
    if bg.kind == "solid":
        out[...] = a
        return
    b = np.asarray(bg.b, np.float32)
    pix = np.arange(S, dtype=np.float32) + 0.5
    P = max(4.0, S / 6.0)                                   # texture period in pixels
    ox = (phx.astype(np.float32) * P)[:, None, None]
    oy = (phy.astype(np.float32) * P)[:, None, None]
    ys = pix[None, :, None] + oy                            # [n, S, 1]
    xs = pix[None, None, :] + ox                            # [n, 1, S]
    if bg.kind == "hstripes":
        t = np.floor(ys / (P / 2)) % 2
    elif bg.kind == "vstripes":
        t = np.floor(xs / (P / 2)) % 2
    elif bg.kind == "dstripes":
        t = np.floor((xs + pix[None, :, None]) / (P / 2)) % 2
    elif bg.kind == "checker":
        t = (np.floor(xs / (P / 2)) + np.floor(ys / (P / 2))) % 2
    elif bg.kind == "vgrad":
        t = np.clip(pix[None, :, None] / S + (oy / P - 0.5) * 0.2, 0, 1)
    elif bg.kind == "hgrad":
        t = np.clip(pix[None, None, :] / S + (ox / P - 0.5) * 0.2, 0, 1)
    elif bg.kind == "dots":
        fx = np.mod(xs, P) - P / 2
        fy = np.mod(ys, P) - P / 2
        t = np.clip(0.5 + P * 0.25 - np.sqrt(fx * fx + fy * fy), 0, 1)
    elif bg.kind == "grid":
        gx = np.abs(np.mod(xs, P) - P / 2)
        gy = np.abs(np.mod(ys, P) - P / 2)
        t = np.clip(np.maximum(gx, gy) - (P / 2 - 1.0), 0, 1)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}")
    np.multiply(t.astype(np.float32, copy=False)[..., None], b - a, out=out)
    out += a


_EXTENT = 1.25   # every shape lies within this many radii of its centre (frame/square corners: 1.2)


def _render_attrs(domain: int, attrs: dict, S: int, window: bool = True) -> np.ndarray:
    """Backgrounds over the full frame; the object's coverage (SDF with analytic anti-aliasing) and
    the compositing only over a square window around it (`window=False`: over the full frame)."""
    d = _domain(domain)
    n = len(attrs["shape"])
    out = np.empty((n, S, S, 3), np.uint8)
    chunk = max(1, (1 << 17) // (S * S))
    size_frac = np.asarray(_SIZE_FRAC, np.float32)
    grid = np.asarray(_GRID, np.float32)
    colours = np.asarray([c for _, c in d.colours], np.float32)
    half = int(math.ceil(_EXTENT * max(_SIZE_FRAC) * 1.08 * S + 1.5))
    W = min(S, 2 * half) if window else S
    ar = np.arange(W)
    for lo in range(0, n, chunk):
        sl = slice(lo, min(n, lo + chunk))
        order = np.argsort(attrs["bg"][sl], kind="stable")          # group backgrounds into slices
        a = {k: v[sl][order] for k, v in attrs.items()}
        m = len(a["shape"])
        pos = a["pos"]
        cx = (grid[pos % 3] + a["jx"].astype(np.float32)) * S
        cy = (grid[pos // 3] + a["jy"].astype(np.float32)) * S
        r = size_frac[a["size"]] * a["scale"].astype(np.float32) * S            # radius in pixels
        x0 = np.clip(np.round(cx).astype(np.int64) - W // 2, 0, S - W)
        y0 = np.clip(np.round(cy).astype(np.int64) - W // 2, 0, S - W)
        rr = r[:, None, None]
        lx = ((x0[:, None] + ar + 0.5).astype(np.float32)[:, None, :] - cx[:, None, None]) / rr   # [m, 1, W]
        ly = (cy[:, None, None] - (y0[:, None] + ar + 0.5).astype(np.float32)[:, :, None]) / rr   # [m, W, 1]
        cov = np.empty((m, W, W), np.float32)
        for k, (_, sdf) in enumerate(d.shapes):
            sel = np.nonzero(a["shape"] == k)[0]
            if sel.size:
                x = np.broadcast_to(lx[sel], (sel.size, W, W))
                y = np.broadcast_to(ly[sel], (sel.size, W, W))
                cov[sel] = np.clip(0.5 - sdf(x, y) * rr[sel], 0, 1)
        img = np.empty((m, S, S, 3), np.float32)
        bounds = np.searchsorted(a["bg"], np.arange(len(d.backgrounds) + 1))
        for k, bg in enumerate(d.backgrounds):
            s0, s1 = bounds[k], bounds[k + 1]
            if s1 > s0:
                _texture(bg, S, a["phase_x"][s0:s1], a["phase_y"][s0:s1], img[s0:s1])
        fg = np.clip(colours[a["colour"]] * a["bright"].astype(np.float32)[:, None], 0, 255)
        flat = ((np.arange(m) * (S * S) + y0 * S + x0)[:, None, None]
                + ar[None, :, None] * S + ar[None, None, :])                    # [m, W, W] pixel rows
        img2 = img.reshape(-1, 3)
        patch = img2[flat]
        patch += (fg[:, None, None, :] - patch) * cov[..., None]
        img2[flat] = patch
        img += 0.5
        out[lo + order] = np.clip(img, 0, 255, out=img)
    return out


def render(domain: int, split, indices, image_size: int = 32, seed: int = 0,
           novel_share: float = NOVEL_SHARE) -> tuple[np.ndarray, list[str]]:
    """Render samples `indices` of (domain, split): (uint8 [n, H, W, 3], captions).

    split: a name of SPLITS ("train", "probe", "reference", "novel", "calibration") or its id. Pure
    function of (seed, domain, split, index) per sample, for a given novel_share.
    """
    image_size = int(image_size)
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (>= 16 recommended), got {image_size}")
    attrs = attributes(domain, split, indices, seed, novel_share)
    return _render_attrs(domain, attrs, image_size), captions_for(domain, attrs)


# ----------------------------------------------------------------------------------------------
# Datasets and stream

def _normaliser():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


class ShapesDataset(Dataset):
    """One (domain, split) slice, rendered once up front and stored as uint8 [N, 3, H, W].

    item i -> (image float [3, H, W] normalised with open_clip's OPENAI mean/std, caption, id).
    Also `pixels` (uint8), `captions`, `ids` (int64 tensor), `attrs` (per-sample attribute indices).
    """

    def __init__(self, domain: int, split, size: int, image_size: int = 32, seed: int = 0,
                 novel_share: float = NOVEL_SHARE):
        self.domain, self.split, self.seed, self.image_size = domain, _split_id(split), seed, int(image_size)
        idx = np.arange(int(size), dtype=np.int64)
        self.attrs = attributes(domain, self.split, idx, seed, novel_share)
        imgs = _render_attrs(domain, self.attrs, self.image_size)
        self.captions = captions_for(domain, self.attrs)
        self.pixels = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
        self.ids = torch.from_numpy(sample_ids(domain, self.split, idx))
        self._ids = self.ids.tolist()
        self._scale, self._bias = _normaliser()

    def __len__(self):
        return len(self.captions)

    def image(self, i):
        return self.pixels[i].float() * self._scale + self._bias

    def __getitem__(self, i):
        return self.image(i), self.captions[i], self._ids[i]

    def __getitems__(self, indices):
        """Batched fetch (torch DataLoader uses it when present): one normalisation for the batch."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.pixels[idx].float() * self._scale + self._bias
        return [(xk, self.captions[j], self._ids[j]) for xk, j in zip(x.unbind(0), idx.tolist())]

    def batch(self, indices) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """Collated batch without a DataLoader: (images [B, 3, H, W], captions, ids int64 [B])."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.pixels[idx].float() * self._scale + self._bias
        return x, [self.captions[j] for j in idx.tolist()], self.ids[idx]

    def images_only(self) -> "ShapesImages":
        return ShapesImages(self)


class ShapesImages(Dataset):
    """Image-only view (ProbeSet.images): item i -> normalised image tensor [3, H, W]."""

    def __init__(self, base: ShapesDataset):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base.image(i)

    def __getitems__(self, indices):
        idx = torch.as_tensor(indices, dtype=torch.long)
        return list((self.base.pixels[idx].float() * self.base._scale + self.base._bias).unbind(0))


def _probe_from(ds: ShapesDataset) -> ProbeSet:
    """Domain d's probe split ("d0_basic", kind "seen"), novel split ("d0_basic/novel", kind "novel")
    or calibration split ("d0_basic/calibration", kind "calibration"): each holds the data of phase d,
    which trains on domain d."""
    name = DOMAINS[ds.domain].name
    name, kind = {PROBE: (name, SEEN_KIND), NOVEL: (name + "/novel", NOVEL_KIND),
                  CALIBRATION: (calibration_name(name), CALIBRATION_KIND)}[ds.split]
    return ProbeSet(name=name, images=ds.images_only(), captions=list(ds.captions),
                    caption_image=torch.arange(len(ds), dtype=torch.int64), ids=ds.ids.clone(),
                    phases=(ds.domain,), kind=kind)


def _zeroshot_from(ds: ShapesDataset) -> list[ZeroShotSet]:
    """Domain d's probe images classified by shape and by colour among domain d's own four of each
    ("d0_basic/shape", "d0_basic/colour"), with ZEROSHOT_TEMPLATES; the probe's embeddings are reused."""
    d = DOMAINS[ds.domain]
    return [ZeroShotSet(name=f"{d.name}/{task}", classes=list(classes), templates=list(ZEROSHOT_TEMPLATES[task]),
                        labels=torch.from_numpy(ds.attrs[task].astype(np.int64)), probe=d.name)
            for task, classes in (("shape", d.shape_names), ("colour", d.colour_names))]


def _check_domains(domains) -> int:
    domains = int(domains)
    if not 1 <= domains <= len(DOMAINS):
        raise ValueError(f"data.shapes.domains must be in [1, {len(DOMAINS)}], got {domains}")
    return domains


def _check_size(name, v, lo=1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) < 10 ** 8:
        raise ValueError(f"{name} must be an integer in [{lo}, 1e8), got {v!r}")
    return int(v)


def _check_probe_size(probe_size: int, novel_share: float) -> int:
    """Refuse a probe larger than its pool of combinations (its captions would repeat)."""
    n = DOMAINS[0].n_combinations
    held = n_held_out(novel_share, n)
    if held and probe_size > held:
        raise ValueError(f"data.probe_size {probe_size} exceeds the {held} held-out combinations per domain "
                         f"(data.shapes.novel_share {novel_share}): novel probe captions would repeat; "
                         "lower probe_size or raise novel_share (0 = no novel probes)")
    if probe_size > n - held:
        raise ValueError(f"data.probe_size {probe_size} exceeds the {n - held} combinations per domain left "
                         f"for training (data.shapes.novel_share {novel_share}): probe captions would repeat")
    return probe_size


def _probe_sets(seed: int, image_size: int, probe_size: int, domains: int, novel_share: float,
                calibration_size: int):
    """(probe sets in stream order: d0_basic, d0_basic/novel, d1_neon, ..., then the calibration sets
    d0_basic/calibration, d1_neon/calibration, ...; the seen probe datasets). The calibration sets
    come last so that the probe sets keep their places whatever calibration_size is."""
    probes, seen = [], []
    for d in range(domains):
        ds = ShapesDataset(d, PROBE, probe_size, image_size, seed, novel_share)
        seen.append(ds)
        probes.append(_probe_from(ds))
        if n_held_out(novel_share, DOMAINS[d].n_combinations):
            probes.append(_probe_from(ShapesDataset(d, NOVEL, probe_size, image_size, seed, novel_share)))
    if calibration_size:
        probes += [_probe_from(ShapesDataset(d, CALIBRATION, calibration_size, image_size, seed, novel_share))
                   for d in range(domains)]
    return probes, seen


def probe_sets(seed: int = 0, image_size: int = 32, probe_size: int = 200, domains: int = 5,
               novel_share: float = NOVEL_SHARE, calibration_size: int = CALIBRATION_SIZE) -> list[ProbeSet]:
    """Every domain's probe split and novel split, then every domain's calibration split, in stream
    order (analyser's `--probe shapes`: the defaults are the default config's)."""
    domains = _check_domains(domains)
    probe_size = _check_probe_size(_check_size("probe_size", probe_size), _check_share(novel_share))
    calibration_size = _check_size("calibration_size", calibration_size, lo=0)
    return _probe_sets(seed, image_size, probe_size, domains, novel_share, calibration_size)[0]


@register_stream("shapes")
def build(data: dict, *, image_size: int, preprocess=None, seed: int = 0) -> Stream:
    """[data] keys: probe_size (200), calibration_size (CALIBRATION_SIZE pairs per domain, 0 = no
    calibration sets); [data.shapes]: domains (5), train_size (4000 per domain),
    reference_size (1000 pairs of the reference domain; 0 = no reference set), reference_texts (2000
    captions of the next reference samples: the text pool, unpaired with the images), novel_share
    (0.25 of each domain's combinations held out of training for the novel probes; 0 = none), seed
    (defaults to the run seed). probe_size may not exceed the held-out (or the seen) combinations.
    `preprocess` is ignored: images are rendered at `image_size`
    and normalised with open_clip's OPENAI mean/std, which is what open_clip's preprocess does."""
    opts = dict(data.get("shapes", {}) or {})
    unknown = set(opts) - {"domains", "train_size", "reference_size", "reference_texts", "novel_share", "seed"}
    if unknown:
        raise ValueError(f"data.shapes: unknown keys {sorted(unknown)}; valid: domains, train_size, "
                         "reference_size, reference_texts, novel_share, seed")
    domains = _check_domains(opts.get("domains", 5))
    train_size = _check_size("data.shapes.train_size", opts.get("train_size", 4000))
    novel_share = _check_share(opts.get("novel_share", NOVEL_SHARE))
    probe_size = _check_probe_size(_check_size("data.probe_size", data.get("probe_size", 200)), novel_share)
    dseed = int(opts.get("seed", seed))
    phases = [Phase(name=DOMAINS[d].name, train=ShapesDataset(d, TRAIN, train_size, image_size, dseed, novel_share))
              for d in range(domains)]
    calibration_size = _check_size("data.calibration_size", data.get("calibration_size", CALIBRATION_SIZE), lo=0)
    probes, seen = _probe_sets(dseed, image_size, probe_size, domains, novel_share, calibration_size)
    zeroshot = [z for ds in seen for z in _zeroshot_from(ds)]  # on the seen probes only
    reference_size = _check_size("data.shapes.reference_size", opts.get("reference_size", 1000), lo=0)
    reference = ShapesDataset(REFERENCE_ID, REFERENCE, reference_size, image_size, dseed) if reference_size else None
    n_texts = _check_size("data.shapes.reference_texts", opts.get("reference_texts", 2000), lo=0)
    info = {"stream": "shapes", "version": VERSION, "domains": [DOMAINS[d].name for d in range(domains)],
            "train_size": train_size, "probe_size": probe_size, "calibration_size": calibration_size,
            "reference_size": reference_size,
            "reference_texts": n_texts, "novel_share": novel_share,
            "held_out": n_held_out(novel_share, DOMAINS[0].n_combinations),
            "image_size": int(image_size), "seed": dseed}
    return Stream(phases=phases, probes=probes, info=info, zeroshot=zeroshot, reference=reference,
                  reference_texts=reference_texts(reference_size, n_texts, dseed))


# ----------------------------------------------------------------------------------------------
# Preview

def preview_html(image_size: int = 64, per_domain: int = 8, seed: int = 0, domains: int | None = None,
                 split="train") -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    domains = len(DOMAINS) if domains is None else _check_domains(domains)
    shown = [REFERENCE_ID] if _split_id(split) == REFERENCE else list(range(domains))  # reference: its own domain
    domains = len(shown)
    rows = []
    for d in shown:
        imgs, caps = render(d, split, np.arange(per_domain), image_size, seed)
        rows.append((imgs, caps))
    titles = []
    for d, (_, caps) in enumerate(rows):
        for c in caps:
            words, lines, cur = c.split(), [], ""
            for w in words:
                if cur and len(cur) + len(w) + 1 > 24:
                    lines.append(cur)
                    cur = w
                else:
                    cur = f"{cur} {w}".strip()
            lines.append(cur)
            titles.append("<br>".join(html.escape(s) for s in lines))
    fig = make_subplots(rows=domains, cols=per_domain, subplot_titles=titles,
                        horizontal_spacing=0.01, vertical_spacing=0.3 / domains)
    for d, (imgs, _) in enumerate(rows):
        for j in range(per_domain):
            fig.add_trace(go.Image(z=imgs[j], hoverinfo="skip"), row=d + 1, col=j + 1)
        fig.update_yaxes(title_text=_domain(shown[d]).name, row=d + 1, col=1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_annotations(font_size=9)
    fig.update_layout(title=f"ShapeWorld preview (seed {seed}, {image_size}px, {split} split)",
                      width=170 * per_domain + 80, height=230 * domains + 80, margin=dict(l=60, r=10, t=80, b=10))
    return fig.to_html(include_plotlyjs=True, full_html=True)


def main(argv: Sequence[str] | None = None) -> int:
    from ..io import atomic_write_text

    p = argparse.ArgumentParser(prog="python -m geomlab.data.shapes", description=__doc__.splitlines()[0])
    p.add_argument("--preview", metavar="FILE.html", required=True, help="write a plotly grid of samples")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--per-domain", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--domains", type=int, default=len(DOMAINS))
    p.add_argument("--split", choices=list(SPLITS), default="train")
    a = p.parse_args(argv)
    if a.per_domain < 1:
        p.error("--per-domain must be >= 1")
    if a.image_size < 8:
        p.error("--image-size must be >= 8")
    atomic_write_text(a.preview, preview_html(a.image_size, a.per_domain, a.seed, a.domains, a.split))
    print(a.preview)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
