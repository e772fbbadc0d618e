"""The CLIP model and its parameter-efficient plumbing: building it from open_clip and its
weights, checkpoints, freezing parts, encoding text and images, weight-space operations."""
