"""The one runtime for every model: set-up, the driver's loop over a spec's plan, backends, summary, run."""
