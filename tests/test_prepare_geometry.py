"""Own-glacier preparation, geometry part: grid, outlines (vector and ICEmapper), DEM, facies.

Synthetic inputs are written into tmp_path with known answers; the last tests run the real
RGI/SRTM sources around Hintereisferner.
"""

from __future__ import annotations

import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyproj
import pytest
import rasterio
import shapely
from affine import Affine

from conftest import EXAMPLE_SOURCES
from dataloader.errors import DataError
from dataloader.prepare import terrain
from dataloader.prepare.facies import facies_fields, parse_date, scene_fractions
from dataloader.prepare.grid import Grid, grid_around, to_crs, utm_epsg
from dataloader.prepare.outlines import (
    icemapper_footprint,
    icemapper_masks,
    masks_for_years,
    rasterise_outline,
    read_vector_outline,
)
from dataloader.prepare.terrain import dem_fields

UTM = 32632
X0, Y0 = 650_000.0, 5_190_000.0   # a 100 m corner in UTM 32N (Oetztal Alps)


# ---------------------------------------------------------------- helpers

def utm_box(left, bottom, right, top, crs=4326):
    """A rectangle with straight edges in UTM 32N, given in ``crs`` (edges densified to 1 m, so
    it keeps its UTM shape through the round trip)."""
    return to_crs(shapely.box(left, bottom, right, top), UTM, crs, step=1.0)


def write_vector(path: Path, records: list[dict], geometries, crs) -> Path:
    gpd.GeoDataFrame(records, geometry=list(geometries), crs=crs).to_file(path)
    return path


def write_tif(path: Path, data: np.ndarray, transform, crs=UTM, nodata=None) -> Path:
    data = data if data.ndim == 3 else data[None]
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata) as dst:
        dst.write(data)
    return path


def small_grid(height=12, width=14) -> Grid:
    return Grid(UTM, X0, Y0 + height * 100.0, height, width)


def real_sources() -> Path:
    return EXAMPLE_SOURCES


# ---------------------------------------------------------------- grid

def test_utm_zone():
    assert utm_epsg(10.75, 46.8) == 32632
    assert utm_epsg(-70.0, -33.0) == 32719
    assert utm_epsg(180.0, 10.0) == 32660
    with pytest.raises(DataError, match="longitude/latitude"):
        utm_epsg(650000.0, 5190000.0)


def test_grid_coordinates_and_floor_rule():
    grid = small_grid(3, 4)
    np.testing.assert_array_equal(grid.x, X0 + np.array([50.0, 150.0, 250.0, 350.0]))
    np.testing.assert_array_equal(grid.y, Y0 + np.array([250.0, 150.0, 50.0]))
    assert grid.transform @ (0, 0) == (X0, Y0 + 300.0)
    lon, lat = grid.lonlat()
    assert lon.shape == lat.shape == (3, 4)
    row, col = grid.cell_of(lon, lat)   # centres come back to their own cell
    np.testing.assert_array_equal(row, np.repeat(np.arange(3)[:, None], 4, axis=1))
    np.testing.assert_array_equal(col, np.repeat(np.arange(4)[None], 3, axis=0))
    corner = to_crs(shapely.Point(X0 + 100.001, Y0 + 199.999), UTM, 4326)
    assert tuple(int(v) for v in grid.cell_of(corner.x, corner.y)) == (1, 1)


def test_grid_too_small_refused():
    outline = utm_box(X0, Y0, X0 + 300.0, Y0 + 300.0)
    assert grid_around(outline, margin_m=300.0).shape == (9, 9)
    with pytest.raises(DataError, match="at least 8 cells"):
        grid_around(outline, margin_m=100.0)


# ---------------------------------------------------------------- vector outlines

def test_square_in_laea_gives_known_cells(tmp_path):
    # 1 km square, offset 30 m east and 40 m north of the cell edges: the western column is
    # 70 % inside, the southern row 60 %, their corner cell 42 %, the eastern column 30 %,
    # the northern row 40 %: 9·9 + 9 + 9 = 99 cells by the ≥ 50 % rule.
    square = utm_box(X0 + 30, Y0 + 40, X0 + 1030, Y0 + 1040, crs=3035)
    path = write_vector(tmp_path / "square.gpkg", [{"glac_id": "G1", "glac_name": "Square"}],
                        [square], 3035)
    outline, info = read_vector_outline(path, ids=["G1"])
    assert info["id_field"] == "glac_id" and info["features"] == 1
    assert info["area_km2"] == pytest.approx(1.0, abs=1e-3)  # UTM scale factor ≈ 0.9999
    grid = grid_around(outline)
    assert grid == Grid(UTM, X0 - 500.0, Y0 + 1600.0, 21, 21)
    mask = rasterise_outline(outline, grid)
    assert mask.dtype == np.float32 and mask.sum() == 99
    rows = slice(6, 16)   # the cells from Y0 + 1000 down to Y0
    cols = slice(5, 15)   # the cells from X0 to X0 + 1000
    expected = np.zeros(grid.shape, np.float32)
    expected[rows, cols] = 1.0
    expected[15, 5] = 0.0  # south-western corner: 0.7 × 0.6 = 42 %
    np.testing.assert_array_equal(mask, expected)
    assert read_vector_outline(path, name="square")[1]["name_field"] == "glac_name"


def test_union_of_ids_and_padded_names(tmp_path):
    parts = [utm_box(X0, Y0, X0 + 500, Y0 + 800), utm_box(X0 + 500, Y0, X0 + 900, Y0 + 800),
             utm_box(X0 + 3000, Y0, X0 + 3500, Y0 + 500)]
    records = [{"RGIId": "RGI50-11.00719_d01", "Name": "Synth Ferner" + " " * 20 + "\u00c0"},
               {"RGIId": "RGI50-11.00719_d02", "Name": "Synth Ferner"},
               {"RGIId": "RGI50-11.00001", "Name": "Other"}]
    path = write_vector(tmp_path / "rgi.shp", records, parts, 4326)
    outline, info = read_vector_outline(path, ids=["RGI50-11.00719_d01", "RGI50-11.00719_d02"])
    assert info["ids"] == ["RGI50-11.00719_d01", "RGI50-11.00719_d02"]
    assert isinstance(outline, shapely.Polygon)   # the shared edge is dissolved
    assert info["area_km2"] == pytest.approx(0.72, rel=1e-3)
    assert rasterise_outline(outline, grid_around(outline)).sum() == 72
    by_name, info = read_vector_outline(path, name="SYNTH ferner")
    assert info["features"] == 2 and by_name.equals(outline)


def test_outline_selection_errors(tmp_path):
    path = write_vector(tmp_path / "rgi.shp", [{"RGIId": "RGI50-11.00897", "Name": "Hef"}],
                        [utm_box(X0, Y0, X0 + 900, Y0 + 900)], 4326)
    with pytest.raises(DataError, match=r"no outline id RGI50-11.99999; available e.g. "
                                        r"RGI50-11.00897"):
        read_vector_outline(path, ids=["RGI50-11.99999"])
    with pytest.raises(DataError, match="no outline named 'Vernagt'"):
        read_vector_outline(path, name="Vernagt")
    with pytest.raises(DataError, match="give outline id"):
        read_vector_outline(path)
    path.with_suffix(".prj").unlink()
    with pytest.raises(DataError, match=r"rgi\.shp: has no CRS"):
        read_vector_outline(path, ids=["RGI50-11.00897"])


def test_outline_without_glacier_cell():
    sliver = utm_box(X0 + 10, Y0 + 10, X0 + 40, Y0 + 90)
    with pytest.raises(DataError, match="no glacier cell"):
        rasterise_outline(sliver, small_grid())


# ---------------------------------------------------------------- DEM

def plane(x, y):
    return 3000.0 + 0.3 * (x - X0) - 0.2 * (y - Y0)


GRADIENT = np.hypot(0.3, 0.2)


def test_dem_fine_plane_exact_moments(tmp_path, monkeypatch):
    # 5 m DEM of a plane, extending 200 m beyond the grid.
    grid = small_grid()
    res = 5.0
    left, top = X0 - 200.0, grid.y_top + 200.0
    n_rows, n_cols = int((grid.height * 100 + 400) / res), int((grid.width * 100 + 400) / res)
    xs = left + (np.arange(n_cols) + 0.5) * res
    ys = top - (np.arange(n_rows) + 0.5) * res
    z = plane(xs[None, :], ys[:, None]).astype(np.float32)
    path = write_tif(tmp_path / "dem5.tif", z, Affine(res, 0, left, 0, -res, top))
    mean, std, info = dem_fields(path, grid)
    assert mean.shape == std.shape == grid.shape and mean.dtype == np.float32
    np.testing.assert_allclose(mean, plane(grid.x[None, :], grid.y[:, None]), atol=2e-3)
    # 20 × 20 pixel centres per cell: the discrete uniform variance (100² − 5²)/12 per axis.
    np.testing.assert_allclose(std, GRADIENT * np.sqrt((100.0**2 - res**2) / 12), rtol=1e-4)
    assert std.mean() == pytest.approx(GRADIENT * 100 / np.sqrt(12), rel=2e-3)
    assert info["dem_resolution_m"] == pytest.approx(5.0) and "exact" in info["method"]
    # Read in strips of grid rows (as for a 1 m DEM): the same fields.
    monkeypatch.setattr(terrain, "MAX_STRIP_PIXELS", 30_000)   # 5 rows per strip
    strip_mean, strip_std, _ = dem_fields(path, grid)
    np.testing.assert_allclose(strip_mean, mean, atol=1e-3)
    np.testing.assert_allclose(strip_std, std, rtol=1e-5)


def test_dem_coarse_geographic_plane(tmp_path):
    # ~22 × 33 m pixels in EPSG:4326 holding the UTM plane: bilinear to 10 m sub-cells.
    grid = small_grid()
    lon0, lat0 = to_crs(shapely.Point(X0 - 1000, Y0 + 2500), UTM, 4326).coords[0]
    step = 0.0003
    lon = lon0 + (np.arange(160) + 0.5) * step
    lat = lat0 - (np.arange(120) + 0.5) * step
    lon_grid, lat_grid = np.meshgrid(lon, lat)
    east, north = pyproj.Transformer.from_crs(4326, UTM, always_xy=True).transform(lon_grid,
                                                                                  lat_grid)
    z = plane(east, north)
    path = write_tif(tmp_path / "dem_ll.tif", z, Affine(step, 0, lon0, 0, -step, lat0), 4326)
    mean, std, info = dem_fields(path, grid)
    np.testing.assert_allclose(mean, plane(grid.x[None, :], grid.y[:, None]), atol=0.05)
    # Sub-cell centres: std of a plane over 10 × 10 points = slope·100/√12·√(1 − 1/10²).
    np.testing.assert_allclose(std, GRADIENT * 100 / np.sqrt(12) * np.sqrt(0.99), rtol=5e-3)
    assert 20.0 < info["dem_resolution_m"] < 35.0 and "lower bound" in info["method"]


def test_dem_errors(tmp_path):
    grid = small_grid()
    z = np.full((20, 20), 2500.0, np.float32)  # 1 km square, the grid is 1.4 × 1.2 km
    short = write_tif(tmp_path / "short.tif", z, Affine(50, 0, X0, 0, -50, grid.y_top))
    with pytest.raises(DataError, match=r"short\.tif: does not cover the glacier grid"):
        dem_fields(short, grid)
    big = np.full((40, 40), 2500.0, np.float32)
    big[10, 12] = -9999.0
    holed = write_tif(tmp_path / "holed.tif", big, Affine(50, 0, X0 - 100, 0, -50,
                                                           grid.y_top + 100), nodata=-9999.0)
    with pytest.raises(DataError, match=r"holed\.tif: has 1 nodata/NaN pixel"):
        dem_fields(holed, grid)
    bare = write_tif(tmp_path / "bare.tif", big, Affine(50, 0, X0 - 100, 0, -50,
                                                         grid.y_top + 100), crs=None)
    with pytest.raises(DataError, match=r"bare\.tif: has no CRS"):
        dem_fields(bare, grid)


# ---------------------------------------------------------------- ICEmapper rasters

def icemapper_raster(grid: Grid, cells: dict[tuple[int, int], np.ndarray]) -> tuple:
    """20 m two-band probabilities over ``grid``: 0.05 everywhere, ``cells`` get their 5 × 5
    pixel blocks of glacier probability."""
    glacier = np.full((grid.height * 5, grid.width * 5), 0.05, np.float32)
    for (row, col), block in cells.items():
        glacier[row * 5:(row + 1) * 5, col * 5:(col + 1) * 5] = block
    return np.stack([1.0 - glacier, glacier]).astype(np.float32), \
        Affine(20.0, 0, grid.x_left, 0, -20.0, grid.y_top)


def test_icemapper_masks_threshold_and_footprint(tmp_path):
    grid = small_grid()
    mixed = np.where(np.arange(25).reshape(5, 5) < 13, 0.6, 0.4)   # mean 0.504
    cells = {(5, 6): np.full((5, 5), 0.9), (5, 7): mixed, (5, 8): np.full((5, 5), 0.45)}
    data, transform = icemapper_raster(grid, cells)
    path = write_tif(tmp_path / "2019.tif", data, transform)
    masks = icemapper_masks({2019: path}, grid)
    expected = np.zeros(grid.shape, np.float32)
    expected[5, 6:8] = 1.0
    np.testing.assert_array_equal(masks[2019], expected)
    np.testing.assert_array_equal(icemapper_masks({2019: path}, grid, threshold=0.55)[2019],
                                  np.where(np.arange(14) == 6, 1.0, 0.0)[None] * (
                                      np.arange(12) == 5)[:, None])
    assert icemapper_masks({2019: path}, grid, threshold=0.4)[2019].sum() == 3
    footprint = icemapper_footprint({2019: path})
    assert to_crs(footprint, 4326, UTM).area == pytest.approx(100 * 100 + 13 * 400, rel=1e-6)
    around = grid_around(footprint, margin_m=400.0)
    np.testing.assert_array_equal(rasterise_outline(footprint, around).sum(), 2)


def test_icemapper_errors(tmp_path):
    grid = small_grid()
    data, transform = icemapper_raster(grid, {(5, 6): np.full((5, 5), 0.9)})
    three = write_tif(tmp_path / "three.tif", np.concatenate([data, data[:1]]), transform)
    with pytest.raises(DataError, match=r"three\.tif: has 3 band\(s\), expected 2"):
        icemapper_masks({2019: three}, grid)
    over = data.copy()
    over[1, 0, 0] = 1.2
    over_path = write_tif(tmp_path / "over.tif", over, transform)
    with pytest.raises(DataError, match=r"over\.tif: has values from .* to 1\.2"):
        icemapper_masks({2019: over_path}, grid)
    path = write_tif(tmp_path / "ok.tif", data, transform)
    with pytest.raises(DataError, match="leaves no glacier cell .* threshold 0.95"):
        icemapper_masks({2019: path}, grid, threshold=0.95)
    with pytest.raises(DataError, match="no pixel with glacier probability"):
        icemapper_footprint({2019: path}, threshold=0.95)
    bare = write_tif(tmp_path / "bare.tif", data, transform, crs=None)
    with pytest.raises(DataError, match=r"bare\.tif: has no CRS"):
        icemapper_masks({2019: bare}, grid)


def test_masks_for_years_rule():
    a, b = np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32)
    stacked = masks_for_years({2005: b, 2000: a}, np.arange(1998, 2008))
    assert stacked.shape == (10, 2, 2) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:, 0, 0], [0] * 7 + [1] * 3)


# ---------------------------------------------------------------- facies

def facies_scene(grid: Grid, tmp_path: Path, name: str, fill: int = 0):
    """10 m classes and confidence over ``grid``; cell (2, 3) holds 50 ice (confidence 0.8),
    30 snow (0.6) and 20 nodata pixels; cell (2, 4) is all debris (0.5)."""
    classes = np.full((grid.height * 10, grid.width * 10), fill, np.int16)
    confidence = np.full(classes.shape, 0.9, np.float32)
    block = np.array([0] * 50 + [1] * 30 + [-9999] * 20, np.int16).reshape(10, 10)
    classes[20:30, 30:40] = block
    confidence[20:30, 30:40] = np.select([block == 0, block == 1], [0.8, 0.6], 0.0)
    classes[20:30, 40:50] = 2
    confidence[20:30, 40:50] = 0.5
    transform = Affine(10.0, 0, grid.x_left, 0, -10.0, grid.y_top)
    return (write_tif(tmp_path / f"{name}_classes.tif", classes, transform, nodata=-9999),
            write_tif(tmp_path / f"{name}_conf.tif", confidence, transform, nodata=0.0))


def test_facies_fractions_and_confidence(tmp_path):
    grid = small_grid()
    classes, confidence = facies_scene(grid, tmp_path, "s")
    maps = scene_fractions(classes, confidence, grid)
    assert maps.shape == (9, 12, 14) and maps.dtype == np.float32
    np.testing.assert_allclose(maps[:, 2, 3], [0.625, 0.375, 0, 0, 0, 0, 0, 0, 0.725], atol=1e-6)
    np.testing.assert_allclose(maps[:, 2, 4], [0, 0, 1, 0, 0, 0, 0, 0, 0.5], atol=1e-6)
    np.testing.assert_allclose(maps[:, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0.9], atol=1e-6)
    without = scene_fractions(classes, None, grid)
    np.testing.assert_array_equal(without[:8], maps[:8])
    assert np.all(without[8] == 1.0)


def hydrological_year(date):
    """Balance year of a date: 1 October → 30 September, labelled by its end; 2015–2020."""
    year = int(str(date)[:4]) + (int(str(date)[5:7]) >= 10)
    return year if 2015 <= year <= 2020 else None


def test_facies_years_latest_scene_and_mask(tmp_path):
    grid = small_grid()
    early = facies_scene(grid, tmp_path, "early", fill=1)    # snow background
    late = facies_scene(grid, tmp_path, "late", fill=0)      # ice background
    autumn = facies_scene(grid, tmp_path, "autumn", fill=3)  # firn background
    mask = np.zeros(grid.shape, np.float32)
    mask[1:4, 2:6] = 1.0
    scenes = [(parse_date("2019-09-10", "f"), *late), (parse_date("2019-08-20", "f"), *early),
              (parse_date("2019-10-15", "f"), autumn[0], None)]
    years, data, info = facies_fields(scenes, grid, hydrological_year, {2019: mask, 2020: mask})
    assert years == [2019, 2020] and data.shape == (2, 9, 12, 14)
    assert info["scenes"][2019]["date"] == "2019-09-10"
    assert info["skipped_earlier_scenes"] == {2019: ["2019-08-20"]}
    assert np.isnan(data[:, :, mask == 0]).all() and not np.isnan(data[:, :, mask == 1]).any()
    assert data[0, 0, 1, 2] == 1.0 and data[1, 3, 1, 2] == 1.0   # ice in 2019, firn in 2020
    assert data[1, 8, 2, 3] == 1.0                                # no confidence file → 1
    np.testing.assert_allclose(data[0, :, 2, 3], [0.625, 0.375, 0, 0, 0, 0, 0, 0, 0.725],
                               atol=1e-6)
    with pytest.raises(DataError, match="scene date 2021-08-01 lies in no balance year"):
        facies_fields([(np.datetime64("2021-08-01"), *late)], grid, hydrological_year,
                      lambda year: mask)


def test_facies_errors(tmp_path):
    grid = small_grid()
    classes, confidence = facies_scene(grid, tmp_path, "s")
    with rasterio.open(classes) as src:
        data, transform = src.read(), src.transform
    data[0, 0, 0] = 9
    nine = write_tif(tmp_path / "nine.tif", data, transform, nodata=-9999)
    with pytest.raises(DataError, match=r"nine\.tif: has class value\(s\) 9; expected 0–7"):
        scene_fractions(nine, None, grid)
    with rasterio.open(confidence) as src:
        conf = src.read()
    conf[0, 5, 5] = 1.5
    high = write_tif(tmp_path / "high.tif", conf, transform, nodata=0.0)
    with pytest.raises(DataError, match=r"high\.tif: has values .* expected a confidence"):
        scene_fractions(classes, high, grid)
    bare = write_tif(tmp_path / "bare.tif", data, transform, crs=None)
    with pytest.raises(DataError, match=r"bare\.tif: has no CRS"):
        scene_fractions(bare, None, grid)
    holes = np.full((1, 120, 140), -9999, np.int16)
    empty = write_tif(tmp_path / "empty.tif", holes, transform, nodata=-9999)
    with pytest.raises(DataError, match="glacier cell"):
        facies_fields([(np.datetime64("2019-09-01"), empty, None)], grid, hydrological_year,
                      {2019: np.ones(grid.shape, np.float32)})


def test_parse_date():
    assert parse_date(" 2019-09-10 ", "x") == np.datetime64("2019-09-10")
    for bad in ("2019-02-30", "20190910", "2019-9-10", "yesterday"):
        with pytest.raises(DataError, match=rf"--facies DATE date '{bad}' does not parse"):
            parse_date(bad, "--facies DATE")


# ---------------------------------------------------------------- real sources (RGI 5, SRTM)

def test_hintereisferner_from_real_sources():
    sources = real_sources()
    start = time.perf_counter()
    outline, info = read_vector_outline(sources / "rgi_oetztal.shp", ids=["RGI50-11.00897"])
    grid = grid_around(outline)
    mask = rasterise_outline(outline, grid)
    z, std, dem = dem_fields(sources / "srtm_oetztal.tif", grid)
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0
    assert grid == Grid(32632, 631100.0, 5187200.0, 49, 70)
    assert info["area_km2"] == pytest.approx(8.036, rel=1e-3)     # RGI 'Area' attribute
    assert mask.sum() * 0.01 == pytest.approx(8.036, rel=0.05)
    glacier = z[mask > 0]
    assert 2350 < glacier.min() < 2550 and 3550 < glacier.max() < 3800
    assert 0.0 < np.median(std[mask > 0]) < 30.0
    assert 70 < dem["dem_resolution_m"] < 95
    by_name, _ = read_vector_outline(sources / "rgi_oetztal.shp", name="Hintereisferner")
    assert by_name.equals(outline)


def test_vernagtferner_union_from_real_sources():
    sources = real_sources()
    parts = ["RGI50-11.00719_d01", "RGI50-11.00719_d02"]
    outline, info = read_vector_outline(sources / "rgi_oetztal.shp", ids=parts)
    grid = grid_around(outline)
    mask = rasterise_outline(outline, grid)
    assert info["area_km2"] == pytest.approx(6.536 + 2.017, rel=2e-3)
    assert mask.sum() * 0.01 == pytest.approx(8.553, rel=0.05)
    first, _ = read_vector_outline(sources / "rgi_oetztal.shp", ids=parts[:1])
    assert rasterise_outline(first, grid).sum() < mask.sum()
