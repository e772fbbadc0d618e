"""Data: the embedded sets, readers of the paper's and ZSCL's datasets on disk, prepared shards,
and the loaders that turn any of them into pixels for training and evaluation."""
