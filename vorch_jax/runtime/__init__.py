"""The one runtime for every model: set-up, the driver's loop over a spec's plan, the ledger, the real and
resident backends, the reference, the summary and traces, run / compare / simulate."""
