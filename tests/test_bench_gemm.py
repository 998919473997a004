"""``python -m convflat.bench gemm``: one row per shape, and a bad shape named."""

import pytest

from convflat.bench import gemm


def test_gemm_bench_prints_a_rate_per_shape_and_dtype(capsys):
    assert gemm.main(["--shapes", "4x3x5,2x2x2", "--batch", "3", "--repeats", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| 4 x", "| 2 x"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0


def test_gemm_bench_names_a_bad_shape():
    with pytest.raises(SystemExit, match="'64x32' is not MxKxN"):
        gemm.main(["--shapes", "64x64x64,64x32"])
