"""Geometry of a synthetic glacier: terrain and ice surface, outlines, roughness, debris, shading,
retreat and surface lowering per year, the coarse reanalysis cells and their orography."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyproj
from scipy.ndimage import binary_erosion, gaussian_filter, maximum_filter

from dataloader.layout import CELL
from dataloader.synthetic.regions import Area, Region


@dataclass(frozen=True)
class Geometry:
    years: np.ndarray        # (Y,) int32 geometry years 1990..max_year
    x: np.ndarray            # (W,) float64 cell centres (m, easting)
    y: np.ndarray            # (H,) float64 cell centres (m, northing, decreasing)
    epsg: int
    z: np.ndarray            # (Y, H, W) float32 surface elevation
    zstddev: np.ndarray      # (Y, H, W) float32 sub-grid roughness
    mask: np.ndarray         # (Y, H, W) bool glacier outlines
    relative_elevation: np.ndarray  # (H, W) 0 at the lowest, 1 at the highest glacier cell of 1990
    debris: np.ndarray       # (H, W) debris cover fraction (persistent)
    shade: np.ndarray        # (H, W) 0..1 topographic shading
    avalanche: np.ndarray    # (H, W) 0..1 snow fed from steep rock walls above
    roughness: np.ndarray    # (H, W) roughness anomaly of the ice surface (about -1..2)
    block_id: np.ndarray     # (H, W) int index of the coarse reanalysis cell
    block_orography: np.ndarray  # (n_blocks,) orography of each coarse cell (m)

    @property
    def orography(self) -> np.ndarray:
        return self.block_orography[self.block_id].astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Spatially correlated noise with unit standard deviation and correlation length ``scale``."""
    field = gaussian_filter(rng.standard_normal(shape), scale, mode="reflect")
    return field / (field.std() + 1e-12)


@lru_cache(maxsize=None)
def _to_utm(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(4326, epsg, always_xy=True)


@lru_cache(maxsize=None)
def _to_wgs84(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(epsg, 4326, always_xy=True)


def to_lonlat(epsg: int, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _to_wgs84(epsg).transform(x, y)


def place(area: Area, height: int, width: int, rng: np.random.Generator):
    """Cell-centre coordinates of a grid around a random point of ``area``; the upper-left
    corner lies on whole hundreds of metres like a grid cut from a regional 100 m raster."""
    lat = rng.uniform(*area.lat)
    lon = rng.uniform(*area.lon)
    x_c, y_c = _to_utm(area.epsg).transform(lon, lat)
    x_left = np.round(x_c / CELL) * CELL - (width // 2) * CELL
    y_top = np.round(y_c / CELL) * CELL + (height // 2) * CELL
    x = x_left + (np.arange(width) + 0.5) * CELL
    y = y_top - (np.arange(height) + 0.5) * CELL
    return x, y


def _rescale(z: np.ndarray, mask: np.ndarray, z_bottom: float, z_top: float) -> np.ndarray:
    """Affine map of the whole field so that the glacier spans exactly [z_bottom, z_top]."""
    lo, hi = z[mask].min(), z[mask].max()
    return z_bottom + (z - lo) / (hi - lo) * (z_top - z_bottom)


def _interior(height: int, width: int) -> np.ndarray:
    """Cells at least one cell away from the grid edge (grids are cut with a margin around
    the glacier)."""
    inside = np.zeros((height, width), dtype=bool)
    inside[1:-1, 1:-1] = True
    return inside


def _valley(height: int, width: int, rng: np.random.Generator, debris_amount: float):
    """A valley glacier flowing along the longer grid axis. Returns an unscaled elevation shape
    (0 at the head, -1 at the 1990 front; rescaled to metres later), the 1990 mask, a retreat
    key (cells; small = lost first), debris and crevasse fields."""
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    # Most glaciers of the northern hemisphere face north; the flow follows the longer axis.
    if width > height or (width == height and rng.random() < 0.5):
        flow_east = rng.random() < 0.5
        s = cols if flow_east else width - cols
        t = rows - height / 2
        length, breadth = width, height
    else:
        flow_north = rng.random() < 0.6
        s = height - rows if flow_north else rows
        t = cols - width / 2
        length, breadth = height, width

    s_head = rng.uniform(1.0, 1.6)  # the headwall keeps the ice off the grid edge
    s_front = length * rng.uniform(0.8, 0.92)
    wiggle, phase = rng.uniform(0.8, 1.6), rng.uniform(0, 2 * np.pi)
    centre = breadth * 0.07 * np.sin(np.pi * s / length * wiggle + phase)
    widest, narrowing = breadth * rng.uniform(0.3, 0.4), rng.uniform(0.3, 0.5)
    half_width = np.maximum(widest * (1 - narrowing * s / length), 1.2)
    # Rounded tongue and cirque corners.
    front_round = np.sqrt(np.clip((s_front - s) / (0.12 * length + 1.0), 0, 1))
    head_round = np.sqrt(np.clip((s - s_head) / 1.0 + 0.6, 0, 1))
    half_width_ice = half_width * front_round * head_round
    across = np.abs(t - centre)
    mask = (across < half_width_ice) & (s >= s_head) & _interior(height, width)

    # Along-flow profile: a steep headwall, an optional icefall, a gentler tongue; the cumulative
    # gradient gives the drop from the head (0) to the 1990 front (1).
    xi = (s - s_head) / (s_front - s_head)
    grid = np.linspace(0.0, 1.0, 401)
    icefall_at, icefall = rng.uniform(0.3, 0.6), rng.uniform(0.0, 2.5)
    gradient = 1 + icefall * np.exp(-(((grid - icefall_at) / 0.07) ** 2)) + 0.8 * np.exp(-grid / 0.08)
    drop = np.concatenate([[0.0], np.cumsum(0.5 * (gradient[1:] + gradient[:-1]) * np.diff(grid))])
    drop /= drop[-1]
    fall = np.interp(np.clip(xi, 0, 1), grid, drop)
    fall = np.where(xi > 1, 1 + 1.2 * gradient[-1] / gradient.mean() * (xi - 1), fall)
    fall = np.where(xi < 0, 3.0 * xi, fall)  # headwall above the bergschrund
    shape = -fall
    # Cross profile: concave accumulation basin, convex tongue; steep rock walls beside the ice.
    inside = np.clip(across / half_width, 0, 1)
    shape = shape + 0.012 * (np.clip(xi, 0, 1) - 0.4) * (1 - inside**2)
    shape = shape + rng.uniform(0.06, 0.12) * np.maximum(across - half_width, 0) ** 1.15
    crevasses = np.clip((icefall * np.exp(-(((xi - icefall_at) / 0.08) ** 2)) - 0.5) / 1.5, 0, 1)

    # Mostly frontal retreat, plus some narrowing of the tongue from its margins.
    key = (s_front - s) + 0.7 * (half_width_ice - across)

    debris = np.zeros_like(shape)
    if debris_amount > 0:
        low = np.clip((xi - 0.5) / 0.4, 0, 1)
        margin = np.clip((across / np.maximum(half_width_ice, 1e-6) - 0.5) / 0.5, 0, 1)
        medial = 0.0
        if rng.random() < 0.6:
            offset = rng.uniform(-0.4, 0.4) * half_width
            medial = np.exp(-(((t - centre - offset) / 0.9) ** 2)) * np.clip((xi - 0.35) / 0.3, 0, 1)
        patches = np.clip(smooth_noise(rng, shape.shape, 1.5) - 0.8, 0, None) * low
        cover = low * (0.3 + 0.9 * margin) + 0.8 * medial + 0.6 * patches
        debris = np.clip(debris_amount * cover, 0, 1)
    return shape, mask, key, debris, crevasses


def _icecap(height: int, width: int, rng: np.random.Generator, debris_amount: float):
    """A dome-shaped ice cap on a tilted plateau with one or two outlet lobes on its low side."""
    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    cy = height / 2 + rng.uniform(-0.05, 0.05) * height
    cx = width / 2 + rng.uniform(-0.05, 0.05) * width
    ry = 0.36 * height * rng.uniform(0.85, 1.0)
    rx = 0.36 * width * rng.uniform(0.85, 1.0)
    dy, dx = (rows - cy) / ry, (cols - cx) / rx
    radius = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    low_side = rng.uniform(-np.pi, np.pi)
    lobes = np.ones_like(radius)
    for k in (2, 3, 4):
        lobes += rng.uniform(0, 0.07) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    for _ in range(rng.integers(1, 3)):
        direction = low_side + rng.normal(0, 0.5)
        off_axis = np.angle(np.exp(1j * (theta - direction)))  # wrapped to [-pi, pi]
        lobes += rng.uniform(0.12, 0.25) * np.exp(-((off_axis / 0.35) ** 2))
    rho = radius / lobes
    mask = (rho < 1) & _interior(height, width)

    # Vialov-like dome on a plateau tilted towards the outlets.
    dome = (1 - np.clip(rho, 0, 1) ** (4 / 3)) ** (3 / 8)
    tilt = -(dx * np.cos(low_side) + dy * np.sin(low_side))
    shape = 0.65 * dome + 0.3 * tilt - 0.25 * np.maximum(rho - 1, 0)
    inside_margin = np.clip(1 - rho, 0, 1)
    crevasses = np.clip((0.15 - inside_margin) / 0.15, 0, 1) * 0.3  # marginal crevasses
    relative = (shape - shape[mask].min()) / (shape[mask].max() - shape[mask].min())
    key = (1 - rho) * 0.5 * (rx + ry) * (0.6 + 1.4 * np.clip(relative, 0, 1))

    debris = np.zeros_like(shape)
    if debris_amount > 0:
        near_low_margin = np.clip((rho - 0.75) / 0.25, 0, 1) * np.clip(1 - relative / 0.3, 0, 1)
        patches = np.clip(smooth_noise(rng, shape.shape, 1.5) - 0.5, 0, None)
        debris = np.clip(debris_amount * near_low_margin * (0.4 + patches), 0, 1)
    return shape, mask, key, debris, crevasses


def _shade(z: np.ndarray) -> np.ndarray:
    """0..1 topographic shading: steep north-facing slopes and cells below a high southern
    horizon (row index grows southwards)."""
    d_south, d_east = np.gradient(z, CELL)
    slope = np.hypot(d_south, d_east)
    northness = d_south / np.maximum(slope, 1e-9)  # rising towards the south = facing north
    own = np.clip((np.degrees(np.arctan(slope)) - 12) / 25, 0, 1) * np.clip(northness, 0, 1)
    horizon = np.zeros_like(z)
    padded = np.pad(z, ((0, 6), (0, 0)), mode="edge")
    for k in range(1, 7):
        rise = (padded[k:k + z.shape[0]] - z) / (k * CELL)
        horizon = np.maximum(horizon, rise)
    wall = np.clip((np.degrees(np.arctan(horizon)) - 20) / 20, 0, 1)
    return np.clip(np.maximum(own, wall), 0, 1)


def _avalanche(z: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """0..1 avalanche feeding: glacier cells near steep rock walls (over 25 degrees, fully fed
    from 45) that rise above them by more than 50 m within two cells. Small cirque glaciers
    under high walls get much of their snow this way; the reanalysis knows nothing of it."""
    d_south, d_east = np.gradient(z, CELL)
    steep = np.clip((np.degrees(np.arctan(np.hypot(d_south, d_east))) - 25) / 20, 0, 1) * ~mask
    wall = np.where(steep > 0, z, -np.inf)
    below_wall = (maximum_filter(wall, size=5) - z) > 50.0
    return np.clip(2.0 * gaussian_filter(steep, 1.5) * below_wall, 0, 1) * mask


def _blocks(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Index of the coarse reanalysis cell of every grid cell. Coarse cells are ~9 km (~90 grid
    cells); small grids get a few large blocks instead, so that even they see some contrast."""
    def side(n: int) -> int:
        return int(rng.integers(80, 100)) if n > 40 else max(4, int(round(n * rng.uniform(0.45, 0.7))))

    by, bx = side(height), side(width)
    rows = (np.arange(height) + rng.integers(0, by)) // by
    cols = (np.arange(width) + rng.integers(0, bx)) // bx
    rows -= rows.min()
    cols -= cols.min()
    return rows[:, None] * (cols.max() + 1) + cols[None, :]


def build_geometry(region: Region, area: Area, kind: str, height: int, width: int, max_year: int,
                   start_year: int, rng: np.random.Generator) -> Geometry:
    years = np.arange(start_year, max_year + 1, dtype=np.int32)
    x, y = place(area, height, width, rng)
    debris_amount = rng.uniform(0.4, 1.0) if rng.random() < region.debris_chance else 0.0
    builder = _icecap if kind == "icecap" else _valley
    shape, mask0, key, debris, crevasses = builder(height, width, rng, debris_amount)
    size = np.sqrt(mask0.sum()) * CELL  # characteristic glacier length (m)

    # Elevation range: steep small glaciers, flatter large ones, within the regional bounds;
    # the glaciers straddle the regional equilibrium line so that they can exist at all.
    slope = rng.uniform(*region.slope)
    extent = (2.0 if kind == "valley" else 1.6) * size
    span = min(slope * extent, region.z_ceiling - region.z_floor)
    # The top lies a fraction of the range above the regional equilibrium line. Ice caps hold
    # most of their area on the flat summit plateau and long glaciers have tongues far below
    # the line: both need a larger share above it to have realistic (negative, not hopeless)
    # balances. A range reaching beyond the regional bounds is cut at the bottom.
    above = rng.uniform(0.05, 0.35) if kind == "icecap" else rng.uniform(0.0, 0.35)
    above += 0.15 * np.clip((span - 400.0) / 800.0, 0, 1)
    z_top = min(region.ela + area.ela_offset + above * span, region.z_ceiling)
    z_bottom = max(z_top - span, region.z_floor)
    shape = shape + 0.004 * smooth_noise(rng, shape.shape, 2.0)
    z0 = _rescale(shape, mask0, z_bottom, z_top)
    # Rough rock terrain off the glacier, finer bumps everywhere.
    off_glacier = gaussian_filter((~mask0).astype(float), 1.0)
    z0 = z0 + off_glacier * 25 * smooth_noise(rng, shape.shape, 1.5)
    z0 = z0 + 2.0 * rng.standard_normal(shape.shape)

    relative = np.clip((z0 - z0[mask0].min()) / (z0[mask0].max() - z0[mask0].min()), 0, 1)

    # Retreat: cells whose key falls below the accumulated retreat are lost. The front recedes
    # at a regional rate, but the area lost stays between a few cells and ~1 % a year (as
    # observed since 1990), whatever the size of the grid.
    n_years = years.size - 1
    key = key + rng.uniform(-0.4, 0.4, key.shape)
    glacier_keys = np.sort(key[mask0])
    least = glacier_keys[min(2, glacier_keys.size - 1)]
    most = np.quantile(glacier_keys, min(0.01 * n_years, 0.35))
    total = float(np.clip(rng.uniform(*region.retreat) * n_years, least, max(most, least)))
    masks = np.empty((years.size,) + mask0.shape, dtype=bool)
    masks[0] = mask0
    for k in range(1, years.size):
        masks[k] = masks[k - 1] & (key > total * k / n_years)

    # Surface lowering, strongest on the tongue, while a cell is still glacierised.
    thinning = region.thinning * rng.uniform(0.7, 1.3) * (1 - relative) ** 1.5 + 0.15
    z = np.empty((years.size,) + mask0.shape, dtype=np.float64)
    z[0] = z0
    for k in range(1, years.size):
        z[k] = z[k - 1] - thinning * masks[k - 1]

    # Sub-grid roughness: smooth ice, crevassed icefalls and margins, rough debris, steep rock,
    # moraine where the ice has gone.
    d_south, d_east = np.gradient(z0, CELL)
    terrain_slope = np.hypot(d_south, d_east)
    edge = mask0 & ~binary_erosion(mask0)
    ice = (rng.uniform(1.5, 3.0) + 11 * crevasses + 3.0 * edge + 6.0 * debris
           + 1.0 * np.abs(smooth_noise(rng, mask0.shape, 1.0)))
    rock = 4.0 + 40.0 * np.clip(terrain_slope, 0, 1.5) ** 1.2 * rng.uniform(0.8, 1.2) \
        + 3.0 * np.abs(smooth_noise(rng, mask0.shape, 1.0))
    moraine = (6.0 + 15.0 * np.clip(terrain_slope, 0, 1.0)
               + 2.0 * np.abs(smooth_noise(rng, mask0.shape, 1.0)))
    zstddev = np.where(masks, ice, np.where(mask0, moraine, rock))
    ice_median = np.median(ice[mask0])
    roughness = np.clip((ice - ice_median) / 4.0, -1.0, 2.0)

    block_id = _blocks(height, width, rng)
    n_blocks = int(block_id.max()) + 1
    glacier_mean = z0[mask0].mean()
    offset = rng.uniform(*region.orography_below)
    block_orography = np.empty(n_blocks)
    for b in range(n_blocks):
        # Coarse cells follow the broad terrain: those over the low valley lie lower.
        terrain = z0[block_id == b].mean()
        block_orography[b] = glacier_mean - offset + 0.25 * (terrain - glacier_mean) + rng.normal(0, 40)
    block_orography = np.round(block_orography, 1)

    return Geometry(
        years=years, x=x, y=y, epsg=area.epsg,
        z=z.astype(np.float32), zstddev=zstddev.astype(np.float32), mask=masks,
        relative_elevation=relative, debris=debris * mask0, shade=_shade(z0),
        avalanche=_avalanche(z0, mask0),
        roughness=roughness, block_id=block_id, block_orography=block_orography,
    )


def stake_cells(geometry: Geometry, n: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices of ``n`` distinct stake cells spread over the elevation range of the glacier,
    inside the outline of every year (the last year's outline is the smallest)."""
    last = geometry.mask[-1]
    inner = binary_erosion(last)
    candidates = np.flatnonzero(inner if inner.sum() >= 2 * n else last)
    n = min(n, candidates.size)
    order = candidates[np.argsort(geometry.z[-1].ravel()[candidates], kind="stable")]
    bins = np.array_split(order, n)
    return np.array(sorted(int(rng.choice(b)) for b in bins), dtype=np.int64)
