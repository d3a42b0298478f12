"""Regional settings of the synthetic twin (see docs/synthetic_twin.md).

Glacier names are invented from made-up stems so that no twin glacier can be mistaken for a
real one.

Every number that differs between the five glacier regions lives here: where the glaciers lie
(for the projected CRS and the stake coordinates), the climate of the coarse reanalysis, the
typical glacier geometry and the regional part of the truth process. Values are chosen so that
the twin's glacier-wide balances resemble the observed ones (docs/synthetic_twin.md, "Statistics
of the twin"); they are not fitted to any real series.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Area:
    """A box in which a region's glaciers are placed; the UTM zone must contain the box."""

    epsg: int
    lat: tuple[float, float]
    lon: tuple[float, float]
    # Continentality inside a region: inland glaciers get less precipitation and a larger
    # seasonal temperature cycle than the maritime ones although they share the weather.
    precip_factor: float = 1.0
    amplitude_offset: float = 0.0
    ela_offset: float = 0.0  # the drier, more continental areas have higher equilibrium lines


@dataclass(frozen=True)
class Region:
    code: str
    areas: tuple[Area, ...]
    # --- climate of the reanalysis at the reference height z_ref (around the year 2005) ---
    z_ref: float                  # m a.s.l.
    t_mean: float                 # annual mean temperature (degC) at z_ref
    t_amplitude: float            # half the warmest-minus-coldest difference of the seasonal cycle
    t_peak_day: int               # day of the year of the warmest day
    t_sigma_winter: float         # day-to-day weather standard deviation in winter (degC)
    t_sigma_summer: float         # ... and in summer
    p_annual: float               # annual precipitation at z_ref (m w.e.)
    p_amplitude: float            # relative amplitude of the seasonal precipitation cycle
    p_peak_day: int               # day of the year of the precipitation maximum
    wet_fraction: float           # mean fraction of wet days
    # --- geometry ---
    ela: float                    # elevation around which the glaciers of the region are placed
    z_floor: float                # lowest glacier elevation of the region
    z_ceiling: float              # highest glacier elevation of the region
    slope: tuple[float, float]    # range of mean along-flow surface slopes (m per m)
    orography_below: tuple[float, float]  # reanalysis orography below the glacier mean (m)
    thinning: float               # surface lowering at the tongue (m per year)
    retreat: tuple[float, float]  # frontal retreat (cells = 100 m per year)
    icecap_share: float           # fraction of ice caps (the rest are valley/outlet glaciers)
    debris_chance: float          # probability that a glacier carries debris cover
    # --- regional part of the truth process ---
    prec_factor: float            # multiplies the truth precipitation factor
    snow_rain_centre: float       # degC, centre of the snow/rain partition
    midseason: tuple[int, int]    # (month, day) of the usual end-of-winter survey
    name_stems: tuple[str, ...]
    name_patterns: tuple[str, ...]


def _region(code: str, values: dict) -> Region:
    """A :class:`Region` from its entry in ``regions.json`` (JSON lists become tuples)."""
    areas = tuple(Area(**{k: tuple(v) if isinstance(v, list) else v for k, v in a.items()})
                  for a in values["areas"])
    rest = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k != "areas"}
    return Region(code=code, areas=areas, **rest)


# The five regions' values are data, kept in regions.json beside this file (one entry per
# region, the fields of Region).
REGIONS: dict[str, Region] = {
    code: _region(code, values)
    for code, values in json.loads((Path(__file__).with_name("regions.json")).read_text()).items()
}

# Lapse rate of the "real" atmosphere in the twin. The models downscale with constants.lapse_rate
# (-0.0060); the difference is a learnable elevation-dependent temperature bias.
TRUE_LAPSE_RATE = -0.0065

# Warming trend of the twin's climate (degC per year), centred on TREND_CENTRE_YEAR.
WARMING_TREND = 0.02
TREND_CENTRE_YEAR = 2005.0
