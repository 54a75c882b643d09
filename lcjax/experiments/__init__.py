"""Whole jobs that start from a checkpoint or run many trainings: evaluation and generation from a workdir
(`inference`), architecture comparisons (`compare`). They sit above the loop; nothing below imports them."""
