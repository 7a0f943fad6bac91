"""The "models from code" entry file MLflow stores with the logged model (register stage).

MLflow executes this file when it loads the model; it names the pyfunc to serve. Kept apart from
serving.py so that importing the package never calls `set_model`.
"""

import mlflow

from imgclf.serving import ImageClassifier, quiet_union_hint_notice

quiet_union_hint_notice()  # before MLflow reads predict's type hints, which it does once this file has run
mlflow.models.set_model(ImageClassifier())
