"""The competition's own files: train/test/folds tables and image paths (``tables``), decoding images
into tensors (``images``), and the submission format (``submission``)."""
