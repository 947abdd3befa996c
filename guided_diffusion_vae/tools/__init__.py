"""Whole jobs built from the layers below: the quickstart, the benchmark,
the diagnosis of a run and latent interpolation."""
