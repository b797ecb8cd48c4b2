"""The maths: task vectors, the decomposition of a 2-D weight, spectral filters, rank rules, the
baselines, diagnostics, routing and the in-memory merge. Pure torch; no I/O, no Prefect."""
