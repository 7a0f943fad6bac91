"""imgclf: a reproducible image-classification pipeline (PyTorch, DVC, MLflow).

One module per DVC stage (download, prepare, train, evaluate, register), each run as
`python -m imgclf.<stage> --params params.yaml`. Importing the package does nothing else.
"""

__version__ = "0.1.0"
