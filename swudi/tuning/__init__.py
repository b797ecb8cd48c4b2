"""``swudi tune``: candidates over a grid and a 1-D refinement of the scale, scored by an objective
(:mod:`swudi.tuning.refine`, :mod:`swudi.tuning.candidates`; the flow is :mod:`flows.tune`)."""
