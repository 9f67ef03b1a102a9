"""After level 1: level-2 models trained on out-of-fold features (``models``) and the post-processing
rules tuned on out-of-fold predictions (``rules``)."""
