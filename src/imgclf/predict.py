"""Batch prediction: classify every image of a folder or archive with a registered model, into a CSV.

    python -m imgclf.predict "models:/digits-lenet@champion" photos/ --out predictions.csv
    python -m imgclf.predict "models:/digits-lenet/3" photos.tar.gz --out predictions.csv --top-k 5

Columns: path, class, probability, top_k ("cat:0.81 dog:0.12 ..."), error (why a file could not be
classified: not an image, over the pixel limit, ...). Images are decoded and resized exactly as for
serving, in parallel threads, and classified in batches; the CSV appears complete or not at all.
Reads the same MLflow store as the pipeline (MLFLOW_TRACKING_URI, else mlflow.db at the repository root).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from imgclf.data.archives import Archive, hidden
from imgclf.data.types import DataError, archive_suffix
from imgclf.files import write_bytes
from imgclf.models import predict_proba
from imgclf.serving import RequestError, load_registered, predictions


def iter_files(source: Path, max_archive_bytes: int = 10**9) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a folder (sorted) or archive, hidden files left out (and an
    archive's links and device files); an archive expanding to more than `max_archive_bytes` is refused."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            relative = path.relative_to(source).as_posix()
            if not hidden(relative):
                yield relative, path.read_bytes()
    elif source.is_file() and archive_suffix(source):
        archive = Archive(source, max_archive_bytes, limit_name="--max-archive-bytes")
        files = archive.listing().files
        yield from archive.read({f for f in files if not hidden(f)})
    else:
        raise ValueError(f"{source}: not a folder or a .tar/.tar.gz/.zip archive")


def batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def classify(
    model, source: Path, top_k: int, batch_size: int, workers: int = 4, max_archive_bytes: int = 10**9
) -> Iterator[list[str]]:
    """CSV rows for every file of `source`, using the served model's decoding and limits."""

    def decode(item: tuple[str, bytes]):
        name, data = item
        try:
            return name, model.decode_all([data])[0], ""
        except RequestError as exc:
            return name, None, exc.message.removeprefix("input 0: ")

    with ThreadPoolExecutor(workers) as pool:  # Pillow decodes without holding the GIL
        for batch in batches(iter_files(source, max_archive_bytes), batch_size):
            decoded = list(pool.map(decode, batch))
            good = [array for _, array, _ in decoded if array is not None]
            probs = predict_proba(model.model, np.stack(good)) if good else np.zeros((0, 0))
            results = iter(predictions(probs, model.card.classes, top_k)) if good else iter(())
            for name, array, error in decoded:
                if array is None:
                    yield [name, "", "", "", error]
                    continue
                p = next(results)
                top = " ".join(f"{t['class']}:{t['probability']:.4f}" for t in p["top_k"])
                yield [name, p["class"], f"{p['probability']:.6f}", top, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", help='e.g. "models:/digits-lenet@champion" or "models:/digits-lenet/3"')
    parser.add_argument("source", type=Path, help="a folder of images, or a .tar/.tar.gz/.zip archive")
    parser.add_argument("--out", type=Path, required=True, help="the CSV to write")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--max-archive-bytes", type=int, default=10**9, help="most an archive's files may expand to (%(default)s)"
    )
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or args.max_archive_bytes < 1:
        parser.error("--top-k, --batch-size and --max-archive-bytes must be at least 1")

    model = load_registered(args.model_uri)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "probability", "top_k", "error"])
    counts = {"ok": 0, "failed": 0}
    try:
        with tqdm(desc="classify", unit="img", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
            for row in classify(
                model, args.source, args.top_k, args.batch_size, max_archive_bytes=args.max_archive_bytes
            ):
                writer.writerow(row)
                counts["failed" if row[4] else "ok"] += 1
                bar.update()
    except (ValueError, DataError) as exc:  # not a folder or archive; an unreadable or oversized archive
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    write_bytes(args.out, buffer.getvalue().encode())
    print(f"predict: {counts['ok']} images classified, {counts['failed']} could not be -> {args.out}")


if __name__ == "__main__":
    main()
