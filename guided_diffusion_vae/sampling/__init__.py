"""From a checkpoint to images per person: rebuild the model from its stored
configuration, sample with guidance, decode and write."""
