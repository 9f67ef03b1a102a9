"""An image-competition pipeline: folds -> pretrain -> train -> features -> stack -> submit.

Import it from a notebook (``from pipeline.config import load_config``) or run the stages with
``python -m pipeline <stage> -c configs/<experiment>.yaml [key=value ...]``.
"""
__version__ = "0.1.0"
