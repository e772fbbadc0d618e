"""Training: the one loop every method runs through (loop.py), its settings, schedule,
augmentation and the task it builds once, the data-parallel launcher, and pretraining."""
