"""The demo (the main job) and the command line."""

import subprocess
import sys

import pytest

from icechunk_distributed.cli import main
from icechunk_distributed.demo import DemoSpec, run_demo, synthetic_dataset


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_demo_writes_and_verifies(tmp_path, executor):
    path = tmp_path / "repo"
    result = run_demo(executor=executor, workers=2, megabytes=4, path=str(path))
    assert result.n_regions == DemoSpec.from_megabytes(4).n_time // 8
    assert result.nbytes == DemoSpec.from_megabytes(4).nbytes
    assert len(result.snapshot_id) == 20
    assert path.exists()  # a given path is kept


def test_synthetic_dataset_pieces_match_the_whole():
    spec = DemoSpec(n_time=16, ny=4, nx=5, time_chunk=4)
    whole = synthetic_dataset(spec)
    assert whole["Tair"].isnull().sum() == 16
    piece = synthetic_dataset(spec, 4, 8)
    assert piece.identical(whole.isel(time=slice(4, 8)))


def test_cli_demo(capsys):
    assert main(["demo", "--executor", "threads", "--mb", "2"]) == 0
    assert "verified; commit" in capsys.readouterr().out


def test_cli_rejects_bad_size(capsys):
    assert main(["demo", "--mb", "0"]) == 2
    assert "--mb must be positive" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "icechunk_distributed", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "demo" in out.stdout
