"""Climate of the synthetic twin.

Two levels, as in a real reanalysis: one daily *regional* weather series per region (seasonal
cycle, warming trend, day-to-day AR(1) weather, slower monthly and interannual anomalies,
Markov-chain wet/dry days with gamma-distributed amounts), shared by every glacier of the region,
and per glacier a handful of *coarse cells* ("blocks") that add their own orography, biases and a
little noise. The blocks are later resampled by nearest neighbour onto the 100 m glacier grid, so
the written climate is constant over blocks.

The reanalysis is also wrong by a different amount every year (`YearErrors`): its summer is too
warm or too cold and its winter too wet or too dry, by an amount shared by the region's glaciers
plus one of each glacier. The truth does not see these errors, so that a year's end-of-summer
snow line (the facies maps) shows what the files get wrong that year.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from dataloader.synthetic.regions import (
    TREND_CENTRE_YEAR,
    TRUE_LAPSE_RATE,
    WARMING_TREND,
    Area,
    Region,
)

DAYS_PER_YEAR = 365.25
PRECIP_PER_METRE = 0.0003  # relative increase of the reanalysis precipitation with cell height
# Errors of the reanalysis that nothing in the files reveals (degC, log-factor): per coarse cell
# (BLOCK_*) and per glacier (HIDDEN_*). Kept small: with 0.25 degC and 8 % model C memorised the
# offsets of its training glaciers instead of learning what transfers
# (docs/synthetic_twin.md, Science check).
BLOCK_T_SIGMA = 0.1
BLOCK_P_SIGMA = 0.03
HIDDEN_T_SIGMA = 0.1
HIDDEN_P_SIGMA = 0.03
# Year-to-year errors of the reanalysis (docs/synthetic_twin.md, Climate, "Year-to-year
# reanalysis errors"): summer temperature (degC) and winter precipitation (log-factor), one
# value per balance year, shared by a region's glaciers ("region") plus one of each glacier
# ("glacier"). Together 0.6 degC and 25 %: against the twin's interannual variability the
# reanalysis's seasonal anomalies then correlate with the true ones at r ~0.86 (summer
# temperature) and ~0.7 (winter precipitation), as a reanalysis's do with a glacier site's.
YEAR_T_SIGMA = {"region": 0.35, "glacier": 0.5}
YEAR_P_SIGMA = {"region": 0.15, "glacier": 0.2}


def decimal_year(dates: np.ndarray) -> np.ndarray:
    """Calendar year plus the fraction of the year elapsed (datetime64[D] -> float64)."""
    year_start = dates.astype("datetime64[Y]")
    year = year_start.astype(np.int64) + 1970
    day_of_year = (dates - year_start.astype("datetime64[D]")).astype(np.int64)
    return year + day_of_year / DAYS_PER_YEAR


def ar1(rng: np.random.Generator, n: int, phi: float) -> np.ndarray:
    """Stationary AR(1) series with unit variance and lag-one correlation ``phi``."""
    burn = int(min(5.0 / max(1.0 - phi, 1e-6), 5000))  # a few e-folding times to forget the start
    noise = rng.standard_normal(n + burn)
    series = lfilter([np.sqrt(1.0 - phi**2)], [1.0, -phi], noise)
    return series[burn:]


@dataclass(frozen=True)
class RegionalWeather:
    """Daily weather of one region at its reference height, for every day of ``dates``."""

    dates: np.ndarray          # datetime64[D]
    cycle: np.ndarray          # cos of the seasonal phase (+1 on the warmest day)
    t_anomaly: np.ndarray      # trend + weather anomalies (degC), without the seasonal cycle
    precipitation: np.ndarray  # m w.e. per day at z_ref, before area/glacier factors
    wet: np.ndarray            # bool, wet day


def regional_weather(region: Region, dates: np.ndarray, rng: np.random.Generator) -> RegionalWeather:
    n = dates.size
    year = decimal_year(dates)
    day_of_year = (year - np.floor(year)) * DAYS_PER_YEAR
    cycle = np.cos(2 * np.pi * (day_of_year - region.t_peak_day) / DAYS_PER_YEAR)

    # Weather is more variable in winter than in summer (cycle = -1 in winter).
    sigma = (0.5 * (region.t_sigma_winter + region.t_sigma_summer)
             - 0.5 * (region.t_sigma_winter - region.t_sigma_summer) * cycle)
    fast = ar1(rng, n, 0.72) * sigma                           # synoptic, days
    slow = ar1(rng, n, np.exp(-1 / 40)) * 1.2                  # weeks to months
    interannual = ar1(rng, n, np.exp(-1 / 365)) * 0.4          # year to year
    trend = WARMING_TREND * (year - TREND_CENTRE_YEAR)

    # Wet/dry days: two-state Markov chain whose wet frequency follows the precipitation season.
    p_cycle = np.cos(2 * np.pi * (day_of_year - region.p_peak_day) / DAYS_PER_YEAR)
    wet_freq = np.clip(region.wet_fraction * (1 + 0.5 * region.p_amplitude * p_cycle), 0.1, 0.7)
    stay_wet = 0.62
    become_wet = wet_freq * (1 - stay_wet) / (1 - wet_freq)
    uniform = rng.random(n)
    wet = np.empty(n, dtype=bool)
    state = uniform[0] < wet_freq[0]
    for d in range(n):
        state = uniform[d] < (stay_wet if state else become_wet[d])
        wet[d] = state

    # Amounts: the seasonal mean, modulated by slow log-anomalies (wet and dry months/years),
    # distributed over the wet days with a skewed gamma distribution.
    log_slow = ar1(rng, n, np.exp(-1 / 30)) * 0.35 + ar1(rng, n, np.exp(-1 / 365)) * 0.18
    log_slow -= 0.5 * (0.35**2 + 0.18**2)  # keep the mean amount unchanged
    mean_daily = region.p_annual / DAYS_PER_YEAR * (1 + region.p_amplitude * p_cycle)
    shape = 0.7
    amount = rng.gamma(shape, 1 / shape, n) * mean_daily / wet_freq * np.exp(log_slow)
    precipitation = np.where(wet, amount, 0.0)

    # Wet days are warmer than dry ones in winter (maritime air) and cooler in summer (cloud).
    wet_signal = -1.0 * cycle * (wet - wet_freq)
    t_anomaly = trend + fast + slow + interannual + wet_signal
    return RegionalWeather(dates=dates, cycle=cycle, t_anomaly=t_anomaly,
                           precipitation=precipitation, wet=wet)


@dataclass(frozen=True)
class YearErrors:
    """Year-to-year errors of the reanalysis: per balance year (``years``) a summer temperature
    error (degC) and a winter precipitation log-factor."""

    years: np.ndarray        # (n,) int balance years
    temperature: np.ndarray  # (n,) degC added to the reanalysis summer
    precipitation: np.ndarray  # (n,) log-factor of the reanalysis winter precipitation

    def __add__(self, other: YearErrors) -> YearErrors:
        if not np.array_equal(self.years, other.years):
            raise ValueError("year errors of different years cannot be added")
        return YearErrors(self.years, self.temperature + other.temperature,
                          self.precipitation + other.precipitation)


def draw_year_errors(years: np.ndarray, level: str, rng: np.random.Generator) -> YearErrors:
    """Independent errors of every balance year at ``level`` ('region' or 'glacier')."""
    years = np.asarray(years)
    return YearErrors(years, rng.normal(0.0, YEAR_T_SIGMA[level], years.size),
                      rng.normal(0.0, YEAR_P_SIGMA[level], years.size))


def daily_year_errors(errors: YearErrors, dates: np.ndarray, cycle: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(D,) temperature error (degC) and precipitation log-factor of each day of ``dates``.

    ``cycle`` is the seasonal phase (+1 on the warmest day, ``RegionalWeather.cycle``). The
    temperature error of balance year y is in full from late May to late September of y and
    fades to 0 a month before and after; the precipitation error of y is in full from late
    October (y - 1) to late April (y) and fades to 0 by late September and late May. Both
    weights vanish where one year's error hands over to the next (midwinter for temperature,
    midsummer for precipitation), so that the errors never jump from one day to the next.
    """
    calendar_year = dates.astype("datetime64[Y]").astype(np.int64) + 1970
    month = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
    summer = np.clip(2.0 * cycle, 0.0, 1.0)
    winter = np.clip(1.0 - 2.0 * cycle, 0.0, 1.0)
    # A winter belongs to the balance year of its January; from July on (winter weight 0 from
    # late May to late September) the days start the next balance year's winter.
    winter_year = calendar_year + (month >= 7)
    first = int(errors.years[0])

    def lookup(values: np.ndarray, year: np.ndarray) -> np.ndarray:
        k = year - first
        inside = (k >= 0) & (k < values.size)
        return np.where(inside, values[np.clip(k, 0, values.size - 1)], 0.0)

    temperature = summer * lookup(errors.temperature, calendar_year)
    log_factor = winter * lookup(errors.precipitation, winter_year)
    return temperature, log_factor


@dataclass(frozen=True)
class BlockClimate:
    """What the files hold (the reanalysis of the coarse cells) and what the glacier really
    experiences (smooth in space, used by the truth)."""

    temperature: np.ndarray         # (n_blocks, D) float32, degC at the block orography
    precipitation: np.ndarray       # (n_blocks, D) float32, m w.e. per day
    true_temperature: np.ndarray    # (D,) float64, degC at the region's reference height z_ref
    true_precipitation: np.ndarray  # (D,) float64, m w.e. per day at the mean orography height


def block_climate(weather: RegionalWeather, region: Region, area: Area, orography: np.ndarray,
                  mean_orography: float, t_bias: float, p_factor: float, hidden_t_bias: float,
                  hidden_p_factor: float, rng: np.random.Generator,
                  year_errors: YearErrors | None = None) -> BlockClimate:
    """Reanalysis climate of the coarse cells of one glacier, and the true local climate.

    ``orography`` (n_blocks,) is the height of each coarse cell. ``t_bias``/``p_factor`` are the
    glacier's departures from the regional climate that the reanalysis resolves;
    ``hidden_t_bias``/``hidden_p_factor`` are those it misses (no model can see them). The
    reanalysis adds per-cell biases and noise of its own; the true climate has none, so the
    truth shows no steps at coarse-cell edges. ``year_errors`` (regional + glacier) are the
    reanalysis's errors of each balance year: in its files only, never in the truth."""
    n_blocks, n = orography.size, weather.dates.size
    amplitude = region.t_amplitude + area.amplitude_offset
    t_regional = region.t_mean + amplitude * weather.cycle + weather.t_anomaly + t_bias
    p_regional = weather.precipitation * area.precip_factor * p_factor
    block_bias = rng.normal(0.0, BLOCK_T_SIGMA, n_blocks)
    temperature = np.empty((n_blocks, n), dtype=np.float32)
    precipitation = np.empty((n_blocks, n), dtype=np.float32)
    if year_errors is None:
        t_error, p_error = np.zeros(n), np.zeros(n)
    else:
        t_error, p_error = daily_year_errors(year_errors, weather.dates, weather.cycle)
        # The log-normal factor keeps the mean winter precipitation unchanged.
        sigma = np.sqrt(YEAR_P_SIGMA["region"] ** 2 + YEAR_P_SIGMA["glacier"] ** 2)
        p_error = p_error - 0.5 * (sigma * np.clip(1.0 - 2.0 * weather.cycle, 0.0, 1.0)) ** 2
    t_reanalysis = t_regional + t_error
    p_reanalysis = p_regional * np.exp(p_error)
    for b in range(n_blocks):
        # Neighbouring coarse cells see the same weather, up to a little local noise.
        local = ar1(rng, n, 0.6) * 0.3
        temperature[b] = (t_reanalysis + TRUE_LAPSE_RATE * (orography[b] - region.z_ref)
                          + block_bias[b] + local)
        # Precipitation rises with the height of the coarse cell; showers vary between cells.
        factor = np.exp(PRECIP_PER_METRE * (orography[b] - region.z_ref) + rng.normal(0.0, BLOCK_P_SIGMA))
        jitter = np.exp(rng.normal(0.0, 0.3, n) - 0.045)
        precipitation[b] = p_reanalysis * factor * jitter
    true_precipitation = (p_regional * hidden_p_factor
                          * np.exp(PRECIP_PER_METRE * (mean_orography - region.z_ref)))
    # Stored precision of a reanalysis product: 0.01 degC, 0.001 mm.
    return BlockClimate(temperature=np.round(temperature, 2), precipitation=np.round(precipitation, 6),
                        true_temperature=t_regional + hidden_t_bias,
                        true_precipitation=true_precipitation)
