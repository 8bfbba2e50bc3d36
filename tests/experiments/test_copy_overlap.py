"""experiments/copy_overlap.py: one row per way of landing a block, and one line for bad input."""

from experiments.copy_overlap import WAYS, main


def test_a_small_run_prints_a_row_per_way_with_its_measurements(capsys):
    assert main(["--sizes-mb", "0.5", "--layers", "3", "--repeats", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("0.5")]
    assert [r[1] for r in rows] == list(WAYS)
    for r in rows:
        alone, queued, compute, layers, loads, serial = map(float, r[2:8])
        assert alone > 0 and queued > 0 and compute > 0 and layers > 0 and loads > 0
        assert abs(serial - (layers + 3 * alone)) < 0.2  # the serial column is the layers plus three loads alone


def test_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["--layers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers" in err[0]
