"""Training: the one loop every method runs through, its settings, schedule, augmentation and
checkpoint-free hand-back, the data-parallel launcher, and the pretraining of the embedded CLIP."""
