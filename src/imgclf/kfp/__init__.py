"""The pipeline on Kubeflow Pipelines (KFP v2): dvc.yaml's six stages as one KFP pipeline.

    python -m imgclf.kfp compile --out pipeline.yaml [--image IMAGE]   # a spec to submit to a cluster
    python -m imgclf.kfp run [--set train.epochs=3 ...]                  # the same spec, run here (kfp.local)

`pipeline` builds the spec from dvc.yaml (stages, and which outputs feed which stage) and params.yaml
(every key a pipeline parameter); `step` is what each component runs: the stage's own module. Needs the
`kfp` extra (`pip install -e ".[kfp]"`); nothing here imports kfp until it is called.
"""
