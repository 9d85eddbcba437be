"""A subset of the parity matrix on every other engine: joblib (loky), Ray, dask, Lithops.

The full matrix runs on threads and a process pool (test_parity.py); here the cases that
exercise the encoding decisions hardest (packing, strings with missing values, cftime data
variables, appends, region writes) run on the engines started the way the rest of the
suite starts them.
"""

from __future__ import annotations

import pytest

from conftest import _engine_params, start_engine
from parity import cases
from parity.test_parity import check_parity

SUBSET = [
    cases.era5_packed,
    cases.strings_object_missing,
    cases.cftime_noleap,
    cases.append_era5_packed,
    cases.rplus_region,
]


@pytest.fixture(params=[pytest.param("joblib"), *_engine_params("ray", "dask", "lithops")])
def engine(request):
    if request.param == "joblib":
        pytest.importorskip("joblib")
        return "joblib"
    return start_engine(request, request.param)


@pytest.mark.parametrize("build", SUBSET, ids=cases.case_id)
def test_parity_on_engine(build, engine, tmp_path):
    check_parity(build, tmp_path, engine)
