"""A dataset the project has never seen, put into the client-folder format as a new user would, trained with
`feddat run --clients-dir` (FedDAT and FedAvg-adapter) and scored against chance on every client.

The data: scikit-learn's handwritten digits (1,797 grey 8x8 scans by 43 writers, shipped inside the scikit-learn
package, so nothing is downloaded at run time: `pip install -e .[bench]`). Three parties, each with its own
question about its own share of the scans (a function-style heterogeneity, one task per client):

    digit   "what digit is this ?"             0 ... 9
    odd     "is the digit odd ?"               yes / no
    large   "is the digit larger than four ?"  yes / no

Each party's folder is one `metadata.jsonl` beside its PNGs (no split folders: the loader splits it by seed, 70%
train, 10% validation, 20% test), exactly as docs/own-data.md describes. Then, as a user would, the script calls
the command line: `feddat run --clients-dir DIR --method M --out OUT/M` for FedDAT and FedAvg-adapter with
default settings, and prints per client the two scores next to chance (the share of the test split's most
frequent answer: what always answering it scores). Writes OUT/unseen.json.

    python bench/unseen_dataset.py --out runs/unseen
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = {
    "digit": ("what digit is this ?", lambda d: str(d)),
    "odd": ("is the digit odd ?", lambda d: "yes" if d % 2 else "no"),
    "large": ("is the digit larger than four ?", lambda d: "yes" if d > 4 else "no"),
}


def write_folders(root: Path, seed: int) -> None:
    """One client folder per question, each with a third of the scans (shuffled by `seed`)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("this script reads scikit-learn's digits: pip install -e .[bench] (scikit-learn)")
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    for k, (name, (question, answer)) in enumerate(QUESTIONS.items()):
        folder = root / name
        folder.mkdir(parents=True)
        rows = []
        for i in order[k::len(QUESTIONS)]:
            grey = (digits.images[i] * (255 / 16)).astype(np.uint8)       # 8x8, 0..16 -> 0..255
            file = f"{int(i):04d}.png"
            Image.fromarray(grey).convert("RGB").resize((48, 48), Image.NEAREST).save(folder / file)
            rows.append({"file_name": file, "question": question, "answer": answer(int(digits.target[i]))})
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def chance(run_dir: Path, folders: Path) -> dict[str, float]:
    """Per client: the share of its test split's most frequent answer (from the run's own split, re-read)."""
    from feddat.data.folders import load_client_folder
    from feddat.models.backbone import load_backbone

    results = json.loads((run_dir / "results.json").read_text())
    _, tokenizer = load_backbone(None)
    out = {}
    for name in results["clients"]:
        c = load_client_folder(folders / name, tokenizer, 8, 48, results["config"]["seed"], check_images=False)
        labels = c.test.labels.tolist()
        out[name] = Counter(labels).most_common(1)[0][1] / len(labels)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="feddat,fedavg-adapter")
    args = ap.parse_args()
    folders = args.out / "clients"
    if not folders.exists():
        write_folders(folders, args.seed)
    scores = {}
    for method in args.methods.split(","):
        run_dir = args.out / method
        if not (run_dir / "results.json").exists():
            subprocess.run([str(Path(sys.executable).parent / "feddat"), "run", "--clients-dir", str(folders), "--method", method,
                            "--seed", str(args.seed), "--out", str(run_dir), "--quiet"], check=True)
        scores[method] = json.loads((run_dir / "results.json").read_text())["final"]["clients"]
    base = chance(args.out / args.methods.split(",")[0], folders)
    methods = list(scores)
    print(f"{'client':8s} {'chance':>7s} " + " ".join(f"{m:>15s}" for m in methods))
    for name in base:
        print(f"{name:8s} {base[name]:7.4f} " + " ".join(f"{scores[m][name]:15.4f}" for m in methods))
    means = {m: sum(s.values()) / len(s) for m, s in scores.items()}
    print(f"{'mean':8s} {sum(base.values()) / len(base):7.4f} " + " ".join(f"{means[m]:15.4f}" for m in methods))
    above = {m: all(scores[m][n] > base[n] for n in base) for m in methods}
    print("above chance on every client: " + ", ".join(f"{m} {'yes' if ok else 'NO'}" for m, ok in above.items()))
    (args.out / "unseen.json").write_text(json.dumps({"seed": args.seed, "chance": base, "scores": scores,
                                                      "means": means, "above_chance": above}, indent=1) + "\n")


if __name__ == "__main__":
    main()
