"""Test helper: is a NetCDF output placed on the map by the tools a colleague would use?

``from georeferencing import assert_georeferenced`` (pytest puts tests/ on ``sys.path``).
"""

from __future__ import annotations

import warnings

import numpy as np
import rasterio
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
from affine import Affine


def assert_georeferenced(path, variable: str, x, y, epsg: int, cell: float = 100.0) -> None:
    """Check ``variable`` of the NetCDF file ``path`` against the grid of cell centres ``x``
    (W,) and ``y`` (H,, decreasing), in metres of EPSG ``epsg`` with square cells of ``cell``
    metres, as read by rioxarray (from the CF grid mapping, the ``GeoTransform`` attribute and
    the coordinates) and by GDAL through rasterio (QGIS's reader).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    np.testing.assert_allclose(np.diff(x), cell, err_msg="x is not the expected grid")
    np.testing.assert_allclose(np.diff(y), -cell, err_msg="y is not the expected grid (decreasing)")
    # Corner-based: the outer corner of the first cell, half a cell from its centre.
    expected = Affine(cell, 0.0, x[0] - cell / 2, 0.0, -cell, y[0] + cell / 2)

    with xr.open_dataset(path, decode_coords="all") as ds, warnings.catch_warnings():
        # rioxarray's own use of affine's deprecated `*` operator; not our concern here.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        da = ds[variable]
        assert da.rio.crs is not None and da.rio.crs.to_epsg() == epsg, f"{path}: CRS {da.rio.crs}"
        np.testing.assert_array_equal(da["x"].values, x)
        np.testing.assert_array_equal(da["y"].values, y)
        # recalc=False trusts the GeoTransform attribute, recalc=True the coordinates: both.
        for recalc in (False, True):
            assert da.rio.transform(recalc=recalc).almost_equals(expected, precision=1e-6), \
                f"{path}: transform {da.rio.transform(recalc=recalc)} (recalc={recalc}), expected {expected}"
        assert da.rio.resolution() == (cell, -cell), f"{path}: resolution {da.rio.resolution()}"
        geotransform = [float(v) for v in ds[da.attrs.get("grid_mapping", da.encoding.get("grid_mapping"))]
                        .attrs["GeoTransform"].split()]
        assert Affine.from_gdal(*geotransform).almost_equals(expected, precision=1e-6)

    with warnings.catch_warnings():
        # GDAL reports a dataset without an overall CRS as NotGeoreferencedWarning: fail on it.
        warnings.simplefilter("error", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(f'netcdf:"{path}":{variable}') as src:
            assert src.crs is not None and src.crs.to_epsg() == epsg, f"{path}: GDAL CRS {src.crs}"
            assert src.transform.almost_equals(expected, precision=1e-6), \
                f"{path}: GDAL transform {src.transform}, expected {expected}"
            assert src.res == (cell, cell)
            assert (src.height, src.width) == (len(y), len(x))
            for row, col in ((0, 0), (len(y) - 1, len(x) - 1), (len(y) // 2, len(x) // 3)):
                assert src.xy(row, col) == (x[col], y[row]), f"{path}: GDAL cell centre ({row}, {col})"
