"""Up-front checks of run_region_writes' arguments: accepted values, and clear refusals."""

import datetime
import math
import re

import icechunk
import numpy as np
import pytest
import xarray as xr

from icechunk_distributed.errors import DistributedWriteError, TemplateMismatchError
from icechunk_distributed.options import (
    RESERVED_METADATA_KEYS,
    check_branch,
    check_encoding,
    check_message,
    check_metadata,
    check_progress,
    check_retries,
    check_task_size,
    check_template_matches,
    check_workers,
)

# -- task_size


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (1, 1),
        (8, 8),
        (np.int64(3), 3),
        (np.uint8(2), 2),
        ("128MB", "128MB"),
        ("1 GiB", "1 GiB"),
        ("1000", "1000"),
        ("0.5KB", "0.5KB"),
    ],
)
def test_task_size_accepted(value, expected):
    result = check_task_size(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "task_size must be at least 1 chunk per task, got 0"),
        (-4, ValueError, "at least 1 chunk per task, got -4"),
        (np.int32(0), ValueError, "at least 1 chunk per task, got 0"),
        ("0MB", ValueError, "task_size '0MB' is 0 bytes; .*'64MB'"),
        ("0.1B", ValueError, "is 0 bytes"),
        ("lots", ValueError, "task_size 'lots' is not a byte size; .*'64MB'"),
        ("-5MB", ValueError, "not a byte size"),
        ("12 parsecs", ValueError, "not a byte size"),
        (2.5, TypeError, r"task_size is a float \(2\.5\); give an int number of chunks.*'64MB'"),
        (64e6, TypeError, r"a float \(64000000\.0\); give an int number .*'64MB'"),
        (np.float32(4), TypeError, "numpy.float32.*int number of chunks"),
        (True, TypeError, r"a bool \(True\)"),
        (np.bool_(True), TypeError, "numpy.bool"),
        ([4], TypeError, r"a list \(\[4\]\).*or None for automatic"),
    ],
)
def test_task_size_refused(value, error, match):
    with pytest.raises(error, match=match):
        check_task_size(value)


def test_task_size_keeps_the_parse_error_as_cause():
    with pytest.raises(ValueError, match="not a byte size") as info:
        check_task_size("big")
    assert isinstance(info.value.__cause__, ValueError)


# -- workers and retries


@pytest.mark.parametrize(("value", "expected"), [(None, None), (1, 1), (16, 16), (np.int16(4), 4)])
def test_workers_accepted(value, expected):
    result = check_workers(value)
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "workers must be at least 1, got 0; pass None"),
        (-1, ValueError, "workers must be at least 1, got -1"),
        (np.int64(0), ValueError, "workers must be at least 1, got 0"),
        (True, TypeError, r"workers must be an int .* not a bool \(True\)"),
        (np.bool_(False), TypeError, "workers must be an int"),
        (2.0, TypeError, r"not a float \(2\.0\)"),
        ("4", TypeError, r"not a str \('4'\)"),
    ],
)
def test_workers_refused(value, error, match):
    with pytest.raises(error, match=match):
        check_workers(value)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (2, 2), (np.uint64(5), 5)])
def test_retries_accepted(value, expected):
    result = check_retries(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (-1, ValueError, "retries must be at least 0 .*got -1; use 0 for no retries"),
        (np.int8(-2), ValueError, "got -2"),
        (None, TypeError, r"retries must be an int >= 0 .* not None"),
        (False, TypeError, "not a bool"),
        (1.0, TypeError, "not a float"),
        ("2", TypeError, "not a str"),
    ],
)
def test_retries_refused(value, error, match):
    with pytest.raises(error, match=match):
        check_retries(value)


# -- progress and message


def on_event(event):
    pass


class Recorder:
    def __call__(self, event):
        pass


@pytest.mark.parametrize("value", [None, True, False, on_event, Recorder(), print])
def test_progress_accepted(value):
    assert check_progress(value) is value


def test_progress_numpy_bool_becomes_bool():
    result = check_progress(np.bool_(True))
    assert result is True


@pytest.mark.parametrize("value", ["yes", 1, 0, {"bar": True}])
def test_progress_refused(value):
    with pytest.raises(TypeError, match=r"progress must be None .*True or False .*callable") as e:
        check_progress(value)
    assert repr(value)[:20] in str(e.value)


@pytest.mark.parametrize("value", [None, "", "ingest 2026-11"])
def test_message_accepted(value):
    assert check_message(value) == value


@pytest.mark.parametrize(
    ("value", "match"), [(3, r"not an int \(3\)"), (b"msg", "not a bytes"), (["a"], "not a list")]
)
def test_message_refused(value, match):
    with pytest.raises(TypeError, match=f"message must be a str .*{match}"):
        check_message(value)


# -- commit metadata


def test_metadata_none():
    assert check_metadata(None) is None


def test_metadata_accepted_and_copied():
    given = {
        "source": "ERA5",
        "n": 3,
        "scale": 0.5,
        "ok": True,
        "missing": None,
        "tags": ("a", "b"),
        "nested": {"levels": [1, 2, {"deep": np.float64(1.5)}]},
        "count": np.int64(7),
        "flag": np.bool_(False),
    }
    result = check_metadata(given)
    assert result == {
        "source": "ERA5",
        "n": 3,
        "scale": 0.5,
        "ok": True,
        "missing": None,
        "tags": ["a", "b"],
        "nested": {"levels": [1, 2, {"deep": 1.5}]},
        "count": 7,
        "flag": False,
    }
    assert type(result["count"]) is int
    assert type(result["flag"]) is bool
    assert result is not given
    result["nested"]["levels"].append(3)
    assert given["nested"]["levels"] == [1, 2, {"deep": np.float64(1.5)}]


def test_metadata_accepts_any_mapping():
    from types import MappingProxyType

    assert check_metadata(MappingProxyType({"a": 1})) == {"a": 1}


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (
            {"when": datetime.datetime(2026, 11, 1)},
            TypeError,
            re.escape(
                "commit metadata['when'] is a datetime.datetime, which cannot be stored as "
                "JSON; convert it, e.g. str(value)"
            ),
        ),
        (
            {"a": {"b": [1, datetime.date(2026, 1, 1)]}},
            TypeError,
            re.escape("commit metadata['a']['b'][1] is a datetime.date"),
        ),
        ({"raw": b"xy"}, TypeError, r"metadata\['raw'\] is a bytes.*value\.decode\(\)"),
        ({"s": {1, 2}}, TypeError, r"metadata\['s'\] is a set.*sorted\(value\)"),
        ({"arr": np.arange(3)}, TypeError, r"numpy\.ndarray.*value\.tolist\(\)"),
        ({"x": math.nan}, ValueError, r"metadata\['x'\] is nan, which JSON cannot store"),
        ({"x": [np.float32("inf")]}, ValueError, r"metadata\['x'\]\[0\] is inf"),
        ({1: "a"}, TypeError, r"commit metadata has the key an int \(1\); .*must be str"),
        ({"a": {2.5: "b"}}, TypeError, r"metadata\['a'\] has the key a float \(2\.5\)"),
        ([("a", 1)], TypeError, r"metadata must be a mapping .* not a list"),
        ("note", TypeError, r"metadata must be a mapping .* not a str \('note'\)"),
    ],
)
def test_metadata_refused(value, error, match):
    with pytest.raises(error, match=match):
        check_metadata(value)


@pytest.mark.parametrize("key", RESERVED_METADATA_KEYS)
def test_metadata_reserved_keys(key):
    with pytest.raises(ValueError, match=f"commit metadata key '{key}' is reserved.*another key"):
        check_metadata({key: {"mine": 1}})


def test_metadata_result_is_accepted_by_icechunk(tmp_path):
    import zarr

    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path)))
    session = repo.writable_session("main")
    zarr.create_group(session.store)
    meta = check_metadata({"count": np.int64(7), "tags": ("a",), "d": {"x": np.float32(0.5)}})
    snapshot = session.commit("m", metadata=meta)
    assert repo.lookup_snapshot(snapshot).metadata == {
        "count": 7,
        "tags": ["a"],
        "d": {"x": 0.5},
    }


# -- branch


@pytest.fixture
def repo(tmp_path):
    return icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "repo")))


def test_branch_exists(repo):
    assert check_branch(repo, "main") is None
    repo.create_branch("dev", repo.lookup_branch("main"))
    assert check_branch(repo, "dev") is None


def test_branch_missing(repo):
    expected = (
        "branch 'dev' does not exist in the repository (branches: ['main']); "
        "create it with repo.create_branch('dev', repo.lookup_branch('main'))"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_branch(repo, "dev")


def test_branch_missing_hides_work_branches_and_suggests(repo):
    tip = repo.lookup_branch("main")
    repo.create_branch("staging", tip)
    repo.create_branch("icechunk-distributed/era5-2026-11", tip)
    with pytest.raises(ValueError, match="does not exist") as info:
        check_branch(repo, "stagign")
    message = str(info.value)
    assert "(branches: ['main', 'staging']); did you mean 'staging'?" in message
    assert "icechunk-distributed/" not in message
    assert "repo.create_branch('stagign', repo.lookup_branch('main'))" in message


def test_branch_not_a_str(repo):
    with pytest.raises(TypeError, match=r"branch must be a str .* not None$"):
        check_branch(repo, None)


# -- encoding

VARIABLES = ["Tair", "station", "time", "lat", "lon"]


def test_encoding_none():
    assert check_encoding(None, VARIABLES) == {}


def test_encoding_accepted_and_copied():
    inner = {"chunks": (2, 6, 8)}
    given = {"Tair": inner, "time": {"units": "hours since 2026-01-01"}}
    result = check_encoding(given, VARIABLES)
    assert result == {"Tair": {"chunks": (2, 6, 8)}, "time": {"units": "hours since 2026-01-01"}}
    assert type(result) is dict
    assert type(result["Tair"]) is dict
    assert result["Tair"] is not inner
    result["Tair"]["chunks"] = (1, 1, 1)
    assert inner == {"chunks": (2, 6, 8)}


def test_encoding_takes_dataset_variables():
    ds = xr.Dataset({"Tair": (("time",), np.zeros(3))}, coords={"time": np.arange(3)})
    assert check_encoding({"Tair": {"chunks": (1,)}}, ds.variables) == {"Tair": {"chunks": (1,)}}


def test_encoding_unknown_variable_suggests_close_match():
    expected = (
        "encoding given for 'Tiar', which is not a variable of the dataset "
        "(variables: ['Tair', 'lat', 'lon', 'station', 'time']); did you mean 'Tair'?"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_encoding({"Tiar": {"chunks": (2, 6, 8)}}, VARIABLES)


def test_encoding_unknown_variable_without_close_match():
    with pytest.raises(ValueError, match=r"encoding given for 'zzz'.*'time'\]\)$"):
        check_encoding({"zzz": {}}, VARIABLES)


@pytest.mark.parametrize(
    ("encoding", "match"),
    [
        ({"Tair": (2, 6, 8)}, r"encoding\['Tair'\] is a tuple .*not a mapping of encoding keys"),
        ({"Tair": None}, r"encoding\['Tair'\] is None, not a mapping"),
        ([("Tair", {})], "encoding must be a mapping of variable name -> encoding.* not a list"),
        ({"chunks": (2, 6, 8)}.items(), "encoding must be a mapping"),
    ],
)
def test_encoding_not_a_mapping(encoding, match):
    with pytest.raises(TypeError, match=match):
        check_encoding(encoding, VARIABLES)


def test_encoding_on_append():
    existing = {"Tair", "time", "lat", "lon"}
    # new variables may get encoding when appending; existing ones are fine without append
    assert check_encoding({"station": {"chunks": (2,)}}, VARIABLES, existing=existing, append=True)
    assert check_encoding({"Tair": {"chunks": (2, 6, 8)}}, VARIABLES, existing=existing)
    expected = (
        "variable 'Tair' already exists in the store; its encoding cannot be changed on "
        "append (mode='a'); drop encoding for it"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        check_encoding({"Tair": {"chunks": (2, 6, 8)}}, VARIABLES, existing=existing, append=True)


# -- template against a Dataset source


def dataset(n_time=12, ny=6, nx=8, dtype="f4"):
    return xr.Dataset(
        {
            "Tair": (("time", "y", "x"), np.zeros((n_time, ny, nx), dtype)),
            "station": (("time",), np.zeros(n_time)),
        },
        coords={"time": np.arange(n_time), "lat": (("y", "x"), np.zeros((ny, nx)))},
    )


def test_template_matches():
    ds = dataset()
    check_template_matches(ds, ds)
    check_template_matches(ds, ds.chunk({"time": 2}))  # lazy template
    check_template_matches(ds, xr.zeros_like(ds))  # other values


def test_template_check_skipped_without_dataset_source():
    check_template_matches(lambda region: dataset(), dataset(n_time=3))
    check_template_matches(dataset(), None)


def test_template_not_a_dataset():
    with pytest.raises(TypeError, match=r"template must be an xarray\.Dataset, not a dict"):
        check_template_matches(dataset(), {"Tair": 1})


@pytest.mark.parametrize(
    ("source", "template", "match"),
    [
        (
            dataset(n_time=10),
            dataset(),
            "dimension 'time' has size 10 in the source and 12 in the template",
        ),
        (
            dataset().isel(y=0),
            dataset(),
            r"dimension 'y' \(size 6 in the template\) is not in the source",
        ),
        (
            dataset().drop_vars("station"),
            dataset(),
            "data variable 'station' of the template is not in the source",
        ),
        (
            dataset().transpose("time", "x", "y"),
            dataset(),
            r"'Tair' has dims \('time', 'x', 'y'\) in the source and \('time', 'y', 'x'\) in",
        ),
        (dataset(dtype="f8"), dataset(), "'Tair' has dtype float64 in the source and float32"),
        (
            dataset().assign(extra=(("time",), np.zeros(12))),
            dataset(),
            r"data variables \['extra'\] of the source are not in the template .*drop_vars",
        ),
    ],
    ids=["size", "missing dim", "missing variable", "dims", "dtype", "extra variable"],
)
def test_template_mismatch(source, template, match):
    with pytest.raises(TemplateMismatchError, match=match) as info:
        check_template_matches(source, template)
    assert isinstance(info.value, DistributedWriteError | ValueError)
    assert str(info.value).startswith("the source does not match the template: ")


def test_template_mismatch_lists_every_problem():
    source = dataset(n_time=10, nx=5)
    with pytest.raises(TemplateMismatchError) as info:
        check_template_matches(source, dataset())
    message = str(info.value)
    assert "dimension 'time' has size 10 in the source and 12 in the template" in message
    assert "dimension 'x' has size 5 in the source and 8 in the template" in message
    assert "'Tair' has shape (10, 6, 5) in the source and (12, 6, 8) in the template" in message
    assert "'station' has shape (10,) in the source and (12,) in the template" in message
