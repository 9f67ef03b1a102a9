"""The offline Kaggle side: predicting a competition from a bundle (``inference``, what the notebook
runs), the wheels a bundle carries (``wheels``) and the package versions it records (``versions``)."""
