"""Disk -> batches and labels: image and array data sets, the label map (one
class per person) and batching."""
