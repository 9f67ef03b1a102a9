"""Training one fold model: networks and heads (``models``), losses, optimizers and schedules, weight
averaging, the fold loop (``trainer``), resume, data-parallel helpers, teacher inputs, and the fold
models' checkpoints and staleness (``fold_models``)."""
