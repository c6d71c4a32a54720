"""Train the MNIST feature classifier once and write the file the package ships.

    python benchmarks/train_mnist_classifier.py [--out src/difflineage/eval/mnist-classifier.safetensors]

The classifier is trained with the fixed recipe of ``difflineage.eval.classifier`` (about 35 s on two CPU
cores) on mnist5k's training split, scored on the 500 held-out images, and written atomically as an fp32
safetensors state dict with its held-out accuracy, the content hash of the training data, recipe and
architecture, the recipe, the torch version and the machine in the file's metadata. The script prints the
file's sha256: a new shipped file means a new ``SHIPPED_SHA256`` in classifier.py and new digit FIDs in the
docs (docs/evaluation.md, "The MNIST feature classifier").
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.eval import classifier as clf
from difflineage.machine import machine_description
from difflineage.storage import sha256_of, writing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=clf.SHIPPED_PATH)
    args = p.parse_args()

    data = DataConfig(source="mnist5k", image_size=clf.INPUT_SIZE, resize="pad")
    train = load_dataset(data, "train")
    start = time.perf_counter()
    model = clf.train_classifier(train, progress=True)
    seconds = time.perf_counter() - start
    held = clf.accuracy(model, load_dataset(data, "heldout"))
    metadata = {"heldout_accuracy": f"{held:.4f}", "content_hash": clf.content_hash(train),
                "arch": clf.ARCH_VERSION, "recipe": json.dumps(clf.RECIPE, sort_keys=True),
                "torch": torch.__version__, "machine": machine_description(),
                "command": "python benchmarks/train_mnist_classifier.py"}
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    with writing(args.out):
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, args.out)
    print(f"trained in {seconds:.0f} s on {metadata['machine']}")
    print(f"held-out accuracy {held:.4f}, content hash {metadata['content_hash']}")
    print(f"wrote {args.out}\nsha256 {sha256_of(args.out)}")


if __name__ == "__main__":
    main()
