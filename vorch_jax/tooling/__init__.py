"""What turns runs into results: sweeps over grids of configs, reports of a run, a compare and a sweep, figures."""
