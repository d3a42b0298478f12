"""The presets of the synthetic twin: which glaciers each asks for, and their names.

A preset fixes, per glacier, the region, fold, grid size, kind, last year and how much is
observed (`GlacierSpec`); everything else about the glacier is drawn from the seed when it is
simulated (`dataloader.synthetic.twin`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataloader.synthetic.regions import REGIONS

PRESETS = ("tiny", "demo", "science", "bench")


@dataclass(frozen=True)
class GlacierSpec:
    """What a preset asks for one glacier; everything else is drawn from the seed."""

    region: str
    fold: int
    shape: tuple[int, int]   # (height, width) in 100 m cells
    kind: str                # 'valley' (incl. outlet glaciers) or 'icecap'
    max_year: int
    stakes: int              # number of stakes; 0 = no point_smb.csv
    facies_years: int        # number of facies maps; 0 = no facies.nc
    seasonal: str            # 'all', 'none' or 'mixed' years with a midseason date
    boundary: str            # 'shared', 'next', 'mixed' or 'fixed' year boundaries


def _tiny_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    end = 1998
    return [
        GlacierSpec("ALP", 0, (12, 16), "valley", end, 5, 2, "all", "shared"),
        GlacierSpec("ICL", 0, (16, 12), "valley", end, 4, 0, "mixed", "mixed"),
        GlacierSpec("SCA", 1, (16, 12), "icecap", end, 4, 2, "mixed", "next"),
        GlacierSpec("PYR", 1, (12, 16), "valley", end, 4, 0, "all", "fixed"),
        GlacierSpec("ALP", 2, (12, 16), "valley", end, 0, 2, "none", "fixed"),
        GlacierSpec("SVAL", 3, (16, 12), "icecap", end, 5, 2, "mixed", "shared"),
    ]


def _demo_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Few distinct grid shapes, so that compiled model functions are shared between glaciers.
    a, b, c, d = (16, 24), (24, 16), (24, 24), (24, 32)
    end = 2008
    return [
        GlacierSpec("ALP", 0, d, "valley", end, 8, 3, "all", "shared"),
        GlacierSpec("ALP", 0, a, "valley", end, 6, 0, "mixed", "mixed"),
        GlacierSpec("SCA", 0, c, "icecap", end, 7, 3, "mixed", "next"),
        GlacierSpec("ICL", 0, d, "valley", end, 8, 3, "all", "mixed"),
        GlacierSpec("ALP", 1, b, "valley", end, 6, 3, "all", "shared"),
        GlacierSpec("SCA", 1, a, "valley", 2007, 6, 0, "mixed", "next"),
        GlacierSpec("SVAL", 1, c, "icecap", end, 6, 3, "mixed", "shared"),
        GlacierSpec("ALP", 2, d, "valley", end, 8, 3, "all", "shared"),
        GlacierSpec("ALP", 2, a, "valley", end, 0, 0, "none", "fixed"),
        GlacierSpec("SCA", 2, c, "icecap", end, 7, 3, "all", "mixed"),
        GlacierSpec("PYR", 2, a, "valley", 2006, 5, 0, "all", "fixed"),
        GlacierSpec("ALP", 3, b, "valley", end, 6, 3, "mixed", "next"),
        GlacierSpec("ICL", 3, d, "valley", end, 7, 0, "mixed", "mixed"),
        GlacierSpec("SVAL", 3, a, "valley", end, 6, 3, "all", "shared"),
    ]


def _science_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Far more training glaciers (24) than demo's 7, on the demo's small grids so that the
    # published schedule of A, C and D runs in about 25 minutes on two cores.
    regions = ["ALP"] * 14 + ["SCA"] * 9 + ["SVAL"] * 5 + ["ICL"] * 5 + ["PYR"] * 3
    shapes = [(16, 24), (24, 16), (24, 24)]
    specs = []
    for code in regions:
        region = REGIONS[code]
        kind = "icecap" if rng.random() < region.icecap_share else "valley"
        shape = shapes[int(rng.integers(len(shapes)))]
        max_year = 2006 if rng.random() < 0.85 else 2005
        # Stakes on every glacier: the check pools point errors over only six test glaciers.
        stakes = int(rng.integers(5, 9))
        facies = 3 if rng.random() < 0.8 else 0
        seasonal = str(rng.choice(["all", "all", "mixed", "none"]))
        boundary = str(rng.choice(["shared", "next", "mixed", "fixed"]))
        specs.append(GlacierSpec(code, 0, shape, kind, max_year, stakes, facies, seasonal, boundary))
    # Folds 0..5 round-robin over the region-sorted list: 6 test, 6 validation, 24 training.
    return [GlacierSpec(**{**s.__dict__, "fold": i % 6}) for i, s in enumerate(specs)]


def _bench_specs(rng: np.random.Generator) -> list[GlacierSpec]:
    # Regional shares of the published dataset (38 ALP, 21 SCA, 9 SVAL, 8 ICL, 2 PYR of 78).
    regions = ["ALP"] * 15 + ["SCA"] * 8 + ["SVAL"] * 4 + ["ICL"] * 3 + ["PYR"] * 2
    specs = []
    for i, code in enumerate(regions):
        region = REGIONS[code]
        if i == 0:
            shape = (100, 150)
        elif i == 15:
            shape = (96, 128)
        else:
            # Log-uniform sizes: many small glaciers, a few large ones.
            shape = (int(np.exp(rng.uniform(np.log(28), np.log(100)))),
                     int(np.exp(rng.uniform(np.log(28), np.log(150)))))
        kind = "icecap" if rng.random() < region.icecap_share else "valley"
        max_year = 2024 if rng.random() < 0.85 else int(rng.choice([2016, 2019, 2021, 2022]))
        cells = shape[0] * shape[1]
        stakes = int(np.clip(cells // 250, 4, 20)) if rng.random() < 0.8 else 0
        facies = int(rng.integers(4, 8)) if rng.random() < 0.7 else 0
        seasonal = str(rng.choice(["all", "all", "mixed", "none"]))
        boundary = str(rng.choice(["shared", "next", "mixed", "fixed"]))
        specs.append(GlacierSpec(code, 0, shape, kind, max_year, stakes, facies, seasonal, boundary))
    # Folds 0..5 dealt round-robin over the region-sorted list: every fold spans regions.
    return [GlacierSpec(**{**s.__dict__, "fold": i % 6}) for i, s in enumerate(specs)]


_SPEC_BUILDERS = {"tiny": _tiny_specs, "demo": _demo_specs, "science": _science_specs,
                  "bench": _bench_specs}
# First year from which facies maps may exist (satellite archive of the preset's period).
FACIES_FROM = {"tiny": 1996, "demo": 2003, "science": 2001, "bench": 2016}


def glacier_specs(preset: str, seed: int = 0) -> list[tuple[str, GlacierSpec]]:
    """The (name, spec) list of a preset; names and the bench layout depend on the seed."""
    if preset not in _SPEC_BUILDERS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    rng = np.random.default_rng([seed, 1])
    specs = _SPEC_BUILDERS[preset](rng)
    names: list[str] = []
    used_stems: set[str] = set()
    for i, spec in enumerate(specs):
        region = REGIONS[spec.region]
        while True:
            fresh = [s for s in region.name_stems if s not in used_stems] or list(region.name_stems)
            stem = str(rng.choice(fresh))
            # The first glacier gets the region's first pattern ('{} Ferner'): a name with a space.
            pattern = region.name_patterns[0 if i == 0 else rng.integers(len(region.name_patterns))]
            name = pattern.format(stem)
            if name.lower() not in {n.lower() for n in names}:
                break
        used_stems.add(stem)
        names.append(name)
    return list(zip(names, specs))
