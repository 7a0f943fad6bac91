# The image every Kubeflow Pipelines task runs in (python -m imgclf.kfp compile --image ...): the project at
# /app with its pinned requirements and the kfp extra. Tasks start in /app, so the default MLflow store
# would be /app/mlflow.db, inside the pod: compile with --tracking-uri pointing at an MLflow server.
#   docker build -t imgclf:latest .                                  torch's CPU-only build
#   docker build --build-arg TORCH=cuda -t imgclf:latest-cuda .      torch's CUDA build (GPU nodes)
ARG BASE=python:3.11-slim
FROM ${BASE}

# cpu: torch and torchvision from PyTorch's CPU-only index (a smaller image); cuda: the PyPI builds,
# which bundle the CUDA libraries (the node provides only the driver).
ARG TORCH=cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false

RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN if [ "$TORCH" = "cpu" ]; then \
        pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu; \
    elif [ "$TORCH" != "cuda" ]; then echo "TORCH must be cpu or cuda, not $TORCH" >&2; exit 2; fi
COPY . .
RUN pip install -r requirements.txt -e ".[kfp]" && python -c "import imgclf.kfp.step, kfp, torch"
