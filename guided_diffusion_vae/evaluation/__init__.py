"""Does each sample show its person, and is it a new walk? ``metrics``
(distribution metrics on features and pixels), ``data`` (labelled image
sets), ``evaluate`` (the whole evaluation, ``scripts/evaluate.py``) and
``monitor`` (the same during training)."""
