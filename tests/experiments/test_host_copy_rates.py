"""experiments/host_copy_rates.py: the three ways of landing a block measured (the donated copy checked to keep its buffer
and the bytes), and a bad size refused with one line and exit status 2."""

import experiments.host_copy_rates as hcr


def test_a_small_block_lands_all_three_ways(capsys):
    assert hcr.main(["--sizes-mb", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "huge-page heap" in out[0]
    mb, fresh, landed, held = out[-1].split()
    assert mb == "1.0" and float(fresh) > 0 and float(landed) > 0 and float(held) > 0


def test_a_bad_size_is_one_line_and_status_2(capsys):
    assert hcr.main(["--sizes-mb", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sizes-mb must be > 0" in err[0]
