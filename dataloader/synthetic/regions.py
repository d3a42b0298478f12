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

from dataclasses import dataclass


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


REGIONS: dict[str, Region] = {
    "ALP": Region(
        code="ALP",
        areas=(Area(32632, (45.9, 47.1), (6.8, 11.8)),),
        z_ref=2700.0, t_mean=-3.2, t_amplitude=8.8, t_peak_day=205,
        t_sigma_winter=3.4, t_sigma_summer=2.4,
        p_annual=2.0, p_amplitude=0.15, p_peak_day=190, wet_fraction=0.45,
        ela=2900.0, z_floor=1900.0, z_ceiling=3650.0, slope=(0.2, 0.32),
        orography_below=(220.0, 420.0), thinning=2.0, retreat=(0.15, 0.35), icecap_share=0.0,
        debris_chance=0.7,
        prec_factor=0.92, snow_rain_centre=1.0, midseason=(5, 1),
        name_stems=("Tessach", "Gurnig", "Faltsch", "Morvin", "Pelkar", "Valdrun", "Sernig",
                    "Klafner", "Ruvell", "Dornach", "Lazun", "Pitzan", "Mallun", "Sotvern",
                    "Trafel", "Gravun", "Selvir", "Munder", "Ladurn", "Tirvall"),
        name_patterns=("{} Ferner", "Vedretta di {}", "Glacier de {}", "{}gletscher", "{} Kees",
                       "Vadret da {}"),
    ),
    "SCA": Region(
        code="SCA",
        areas=(Area(32632, (60.6, 62.0), (6.3, 8.8), precip_factor=1.15, ela_offset=-40.0),
               Area(32633, (66.3, 67.6), (13.6, 16.8), precip_factor=0.75, amplitude_offset=1.5,
                    ela_offset=160.0)),
        z_ref=1250.0, t_mean=-1.0, t_amplitude=6.8, t_peak_day=207,
        t_sigma_winter=3.6, t_sigma_summer=2.2,
        p_annual=2.1, p_amplitude=0.3, p_peak_day=345, wet_fraction=0.6,
        ela=1540.0, z_floor=950.0, z_ceiling=2050.0, slope=(0.1, 0.2),
        orography_below=(150.0, 350.0), thinning=1.5, retreat=(0.1, 0.3), icecap_share=0.4,
        debris_chance=0.25,
        prec_factor=1.05, snow_rain_centre=1.3, midseason=(5, 10),
        name_stems=("Kvitle", "Austra", "Storle", "Hestra", "Blaavik", "Tindra", "Skarve",
                    "Svartle", "Langvik", "Grovle", "Fonnvik", "Raudle", "Midtvik", "Vesla",
                    "Sollen", "Myrkle"),
        name_patterns=("{}breen", "{}breen", "{}isen", "{}fonna", "{}jokulen"),
    ),
    "ICL": Region(
        code="ICL",
        areas=(Area(32628, (63.9, 64.7), (-17.9, -15.2)),),
        z_ref=650.0, t_mean=1.2, t_amplitude=5.6, t_peak_day=210,
        t_sigma_winter=3.2, t_sigma_summer=1.8,
        p_annual=2.3, p_amplitude=0.25, p_peak_day=330, wet_fraction=0.65,
        ela=990.0, z_floor=80.0, z_ceiling=1700.0, slope=(0.08, 0.13),
        orography_below=(250.0, 450.0), thinning=2.5, retreat=(0.3, 0.55), icecap_share=0.0,
        debris_chance=0.6,
        prec_factor=1.12, snow_rain_centre=1.6, midseason=(5, 5),
        name_stems=("Hrutla", "Skalda", "Kvisla", "Sidra", "Heinla", "Falda", "Morna", "Hofla",
                    "Lambra", "Stigla", "Brunna", "Flaga"),
        name_patterns=("{}jokull", "{}arjokull", "{}sjokull"),
    ),
    "SVAL": Region(
        code="SVAL",
        areas=(Area(32633, (77.2, 79.0), (13.0, 17.8)),),
        z_ref=300.0, t_mean=-3.5, t_amplitude=8.2, t_peak_day=205,
        t_sigma_winter=4.2, t_sigma_summer=1.6,
        p_annual=1.3, p_amplitude=0.2, p_peak_day=320, wet_fraction=0.45,
        ela=470.0, z_floor=40.0, z_ceiling=1100.0, slope=(0.08, 0.14),
        orography_below=(120.0, 250.0), thinning=0.8, retreat=(0.15, 0.4), icecap_share=0.5,
        debris_chance=0.2,
        prec_factor=0.95, snow_rain_centre=0.6, midseason=(5, 12),
        name_stems=("Aavika", "Krossla", "Tunvik", "Holmla", "Vestla", "Midla", "Kollvik",
                    "Penla", "Nathla", "Ebbvik", "Sefla", "Lovika"),
        name_patterns=("{}breen", "{}breen", "{}fonna", "{}isen"),
    ),
    "PYR": Region(
        code="PYR",
        areas=(Area(32631, (42.55, 42.8), (0.1, 1.6)),),
        z_ref=2650.0, t_mean=0.2, t_amplitude=8.2, t_peak_day=205,
        t_sigma_winter=3.2, t_sigma_summer=2.4,
        p_annual=1.8, p_amplitude=0.2, p_peak_day=320, wet_fraction=0.4,
        ela=3270.0, z_floor=2750.0, z_ceiling=3400.0, slope=(0.22, 0.32),
        orography_below=(250.0, 400.0), thinning=1.8, retreat=(0.15, 0.25), icecap_share=0.0,
        debris_chance=0.5,
        prec_factor=0.88, snow_rain_centre=0.9, midseason=(5, 5),
        name_stems=("Arrenc", "Gerdal", "Sarrat", "Biscarra", "Ordal", "Pessons", "Tuquet",
                    "Barrosa", "Comalat", "Estanyol"),
        name_patterns=("Glaciar de {}", "Glacier de {}", "Glaciar del {}"),
    ),
}

# Lapse rate of the "real" atmosphere in the twin. The models downscale with constants.lapse_rate
# (-0.0060); the difference is a learnable elevation-dependent temperature bias.
TRUE_LAPSE_RATE = -0.0065

# Warming trend of the twin's climate (degC per year), centred on TREND_CENTRE_YEAR.
WARMING_TREND = 0.02
TREND_CENTRE_YEAR = 2005.0
