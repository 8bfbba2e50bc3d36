"""The modelled machine: hardware profiles, the simulated engine and clock, the simulated backend the driver runs
on, routing traces to replay."""
