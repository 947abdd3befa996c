"""Evaluation of generated spectrograms against real ones.

``classifier`` (the reference person classifier), ``metrics`` (distribution
metrics on features and pixels) and ``data`` (labelled image sets) are the
ground floor that ``vae_training`` also uses; ``evaluate`` runs the whole
evaluation (``scripts/evaluate.py``) and ``report`` writes the HTML report
(``scripts/report.py``).
"""
