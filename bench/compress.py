"""Benchmark: the compress stage's methods on CIFAR-10, for the registry's CIFAR nets.

    python bench/compress.py --epochs 2

For each archive (`--archives`, default the JPEG and the PNG copy of CIFAR-10 in ../shared/datasets, or
the folder IMGCLF_DATASETS names) and each model (`--models`, default fastnet and lenet; fastnet with
presets/fast-cifar.yaml, the others with presets/default.yaml, `--epochs` epochs, train.seed 0): the
download and prepare stages, training on the CPU, then the float model as served (PyTorch, from its
checkpoint), the same graph in float under onnxruntime (what int8 is compared with inside one runtime),
int8 (imgclf.compress: onnxruntime's static quantization, 512 calibration images, seed 0) and the pruned
network (`--prune-amount`, `--finetune-epochs`), all timed in this one process on the same test images,
taking turns call by call. With `--pt2e`, also PyTorch's maintained int8 path for comparison: torchao's
PT2E quantization with the X86 inductor quantizer (the same 512 calibration images), run by
torch.compile (inductor, weights frozen); its size is that of its saved `torch.export` program. Prints one table row per model and variant: test accuracy, size on disk,
median ms per image at batch 1 (and the 90th percentile), images/s at batch 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from finetune import prepared_params, split  # bench/finetune.py: the stages that make the data

from imgclf.allocator import keep_freed_memory
from imgclf.compress import accuracy, calibration_sample, quantize_int8, timings
from imgclf.config import CompressConfig, Params, load_params
from imgclf.cpus import available_cpus
from imgclf.export import nchw, to_onnx
from imgclf.models import WEIGHTS_FILE, Classifier, load_checkpoint_dir, predict_proba, save_checkpoint
from imgclf.onnx_model import OnnxClassifier
from imgclf.prune import prune_and_finetune
from imgclf.train import fit, new_card

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("IMGCLF_DATASETS", REPO.parent / "shared" / "datasets"))
DEFAULT_ARCHIVES = [DATASETS / "cifar10-jpg.tar.gz", DATASETS / "cifar10-png.tar.gz"]
PRESETS = {"fastnet": "fast-cifar", "fastnet-s": "fast-cifar"}  # others: default
CPU = torch.device("cpu")


def log(*args) -> None:
    print(*args, flush=True)


def with_preset(work: Path, preset: str) -> Params:
    """The params prepared_params wrote in `work`, with another train preset (the data stays prepared)."""
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["train"]["preset"] = preset
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return load_params(work / "params.yaml")


def pt2e_int8(served, card, calibration: np.ndarray) -> tuple[Callable[[np.ndarray], np.ndarray], int]:
    """torchao's PT2E int8 of the served classifier: a runner (uint8 NHWC -> probabilities) and the bytes
    of its saved exported program. (Imported here: torchao is a development requirement only.)"""
    import torch._inductor.config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    # The network alone is quantized, the classifier's normalisation and test-time views staying around it:
    # PT2E takes one module called several times (the views) for one layer with several outputs, and fails.
    with torch.no_grad():
        inputs = [served.normalise(nchw(calibration[i : i + 64])) for i in range(0, len(calibration), 64)]
    # An example of 2 images: a batch of 1 would make export specialise the batch dimension to 1.
    example, batch = (inputs[0][:2],), ({0: torch.export.Dim("batch", min=1, max=4096)},)
    graph = torch.export.export(served.net, example, dynamic_shapes=batch).module()
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in inputs:
            prepared(x)
    quantized = convert_pt2e(prepared)
    saved = io.BytesIO()
    torch.export.save(torch.export.export(quantized, example, dynamic_shapes=batch), saved)
    torch._inductor.config.freezing = True  # constant-fold the int8 weights into the compiled kernels
    views = Classifier(
        torch.compile(quantized), list(card.mean), list(card.std), card.num_classes, card.tta_flip, card.tta_translate
    )
    views.training = False  # the views of eval mode; not .eval(), which exported modules refuse

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():  # in batches of 512, as OnnxClassifier runs its graph
            logits = [views(nchw(images[i : i + 512])) for i in range(0, len(images), 512)]
            return torch.softmax(torch.cat(logits), dim=1).numpy()

    return run, len(saved.getvalue())


def bench_model(params, model: str, args, work: Path) -> list[tuple[str, dict]]:
    prepared = Path(params.prepare.out_dir)
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, model=model, epochs=args.epochs))
    card = new_card(params, json.loads((prepared / "meta.json").read_text()))
    train, val, test = split(prepared, "train"), split(prepared, "val"), split(prepared, "test")
    start = time.perf_counter()
    result = fit(params, card, train, val, CPU)
    log(f"  {model}: trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s")
    torch.set_num_threads(args.threads or available_cpus())  # training set its own (train.threads)
    save_checkpoint(result.model, card, work / model)  # the float model as register logs and serving loads it
    served, card = load_checkpoint_dir(work / model)
    float_graph = to_onnx(served, card, nchw(test.images[:2]))
    int8_graph = quantize_int8(served, card, calibration_sample(train.images, 512, 0))
    cfg = CompressConfig("prune", 512, 0, args.prune_amount, args.finetune_epochs, "", "")
    pruned_graph = to_onnx(
        prune_and_finetune(served, card, cfg, (train.images, train.labels)), card, nchw(test.images[:2])
    )
    threads = torch.get_num_threads()
    runtimes = {
        name: OnnxClassifier(g, card.num_classes, threads)
        for name, g in [("onnx-fp32", float_graph), ("int8", int8_graph), ("pruned", pruned_graph)]
    }
    runners = {"float": lambda x: predict_proba(served, x)} | {name: r.predict_proba for name, r in runtimes.items()}
    sizes = {
        "float": (work / model / WEIGHTS_FILE).stat().st_size,
        "onnx-fp32": len(float_graph),
        "int8": len(int8_graph),
        "pruned": len(pruned_graph),
    }
    if args.pt2e:
        runners["int8-pt2e"], sizes["int8-pt2e"] = pt2e_int8(served, card, calibration_sample(train.images, 512, 0))
    clock = timings(runners, test.images, args.single, args.batches)
    rows = []
    for name, run in runners.items():
        rows.append(
            (name, {"accuracy": accuracy(run(test.images), test.labels), "size_bytes": sizes[name], **clock[name]})
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archives", type=Path, nargs="+", default=DEFAULT_ARCHIVES)
    parser.add_argument("--models", nargs="+", default=["fastnet", "lenet"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--prune-amount", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--single", type=int, default=200, help="timed batch-1 calls per variant")
    parser.add_argument("--batches", type=int, default=20, help="timed batch-64 calls per variant")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of both runtimes; 0 = one per core")
    parser.add_argument("--pt2e", action="store_true", help="also torchao's PT2E int8 under torch.compile")
    args = parser.parse_args()
    missing = [str(a) for a in args.archives if not a.is_file()]
    if missing:
        raise SystemExit(f"absent: {', '.join(missing)}")
    torch.set_num_threads(args.threads or available_cpus())
    keep_freed_memory()  # as the train stage does
    table = []
    for archive in args.archives:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"{archive.name}: preparing")
            work = Path(tmp)
            prepared_params(archive.resolve(), work, 32, "default")  # download and prepare, once
            for model in args.models:
                params = with_preset(work, PRESETS.get(model, "default"))
                table += [(archive.name, model, *row) for row in bench_model(params, model, args, work)]
    log(
        f"\n{torch.get_num_threads()} CPU threads, torch {torch.__version__}; {args.epochs} training epochs; timings: "
        f"median of {args.single} calls at batch 1, of {args.batches} batches of 64, the variants taking turns"
    )
    log(
        f"{'data':<20} {'model':<10} {'variant':<10} {'accuracy':>9} {'bytes':>11} {'x float':>8} "
        f"{'ms/img b1':>10} {'p90':>7} {'img/s b64':>10} {'b1 speedup':>11}"
    )
    for data, model, name, row in table:
        base = next(r for d, m, n, r in table if (d, m, n) == (data, model, "float"))
        log(
            f"{data:<20} {model:<10} {name:<10} {row['accuracy']:>9.4f} {row['size_bytes']:>11,} "
            f"{row['size_bytes'] / base['size_bytes']:>8.3f} {row['latency_ms_batch1']:>10.3f} "
            f"{row['latency_ms_batch1_p90']:>7.3f} {row['images_per_s_batch64']:>10,.0f} "
            f"{base['latency_ms_batch1'] / row['latency_ms_batch1']:>11.2f}"
        )


if __name__ == "__main__":
    main()
