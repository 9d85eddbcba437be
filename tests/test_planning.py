"""The plan's own tiling: aligned with every variable's chunks, disjoint and covering.

``build_plan`` skips the per-region checks for the regions it makes itself (they cost
microseconds each, and a plan may have millions); this pins that its tiling needs none.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icechunk_distributed.errors import InvalidRegionError
from icechunk_distributed.planning import build_plan, validate_regions

DIMS = ("t", "y", "x")


@st.composite
def plans(draw):
    n_dims = draw(st.integers(1, 3))
    dims = DIMS[:n_dims]
    sizes = {d: draw(st.integers(1, 40)) for d in dims}
    # Variables over a subset of the dims (the first dim always: the region dim), each with
    # its own chunk sizes: the tiling must align with all of them.
    n_vars = draw(st.integers(1, 3))
    var_dims, units = {}, {}
    for k in range(n_vars):
        mine = tuple(d for d in dims if d == dims[0] or draw(st.booleans()))
        var_dims[f"v{k}"] = mine
        units[f"v{k}"] = {d: draw(st.integers(1, 12)) for d in mine}
    offsets = {dims[0]: draw(st.integers(0, 30))} if draw(st.booleans()) else {}
    region_dims = dims[: draw(st.integers(1, n_dims))]
    task_size = draw(st.one_of(st.none(), st.integers(1, 50), st.just("4KB")))
    return dict(
        dims=var_dims,
        units=units,
        itemsizes={v: 4 for v in var_dims},
        sizes=sizes,
        offsets=offsets,
        region_dims=region_dims,
        task_size=task_size,
        parallelism=draw(st.integers(1, 8)),
    )


@settings(max_examples=300, deadline=None)
@given(plans())
def test_the_plans_own_tiling_passes_every_check(kwargs):
    plan, refused = _build(kwargs)
    if refused is not None:
        # Only refusals that look at the plan as a whole: a variable without a region dim
        # that the tiling splits.
        assert "has no dimension" in str(refused)
        return
    validate_regions(plan, require_cover=True)  # every per-region check, too
    assert plan.regions


def _build(kwargs):
    try:
        return build_plan(**kwargs), None
    except InvalidRegionError as exc:
        return None, exc


def test_explicit_regions_are_still_checked_one_by_one():
    kwargs = dict(dims={"v": ("t",)}, units={"v": {"t": 4}}, itemsizes={"v": 4}, sizes={"t": 16})
    with pytest.raises(InvalidRegionError, match="not aligned"):
        build_plan(**kwargs, regions=[{"t": slice(0, 6)}, {"t": slice(6, 16)}])
    with pytest.raises(InvalidRegionError, match="overlap"):
        build_plan(**kwargs, regions=[{"t": slice(0, 8)}, {"t": slice(4, 16)}])
