"""Ray Train trainer: config, loop, EMA, schedules, checkpoints, metrics."""
