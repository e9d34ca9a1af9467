"""What a benchmark holds: sample sheets per client, split sizes, answer and question-type distributions, and
how far apart the clients' distributions are (pairwise Jensen-Shannon divergence, base 2: 0 = the same, 1 =
disjoint). Data first (`stats.json`), then views of it (the table, the PNG sheets)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from feddat.data.benchmarks import client_records, label_space
from feddat.data.pool import Records
from feddat.data.sizes import Sizes

SAMPLES = 12
SCALE = 3          # images drawn at 144 px
COLUMNS = 4
TEXT_ROWS = 3      # lines of text under each image


def js_divergence(p: dict[str, int], q: dict[str, int]) -> float:
    """Jensen-Shannon divergence (base 2) between two count tables over any keys; in [0, 1]."""
    keys = sorted(set(p) | set(q))
    a = np.asarray([p.get(k, 0) for k in keys], dtype=float)
    b = np.asarray([q.get(k, 0) for k in keys], dtype=float)
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x):
        nz = x > 0
        return float(np.sum(x[nz] * np.log2(x[nz] / m[nz])))

    return max(0.0, (kl(a) + kl(b)) / 2)


def _pairwise(tables: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    names = list(tables)
    return {a: {b: round(js_divergence(tables[a], tables[b]), 4) for b in names} for a in names}


def _mean_off_diagonal(matrix: dict[str, dict[str, float]]) -> float:
    values = [v for a, row in matrix.items() for b, v in row.items() if a != b]
    return round(float(np.mean(values)), 4) if values else 0.0


def benchmark_stats(records: dict[str, dict[str, Records]],
                    images: dict[str, dict[str, int]] | None = None) -> dict:
    """Per client: split sizes, answer and question-type counts (all splits); pairwise JS divergences.
    `images`: the distinct images per client and split, where the records hold only some of them."""
    clients = {}
    for name, splits in records.items():
        answers = Counter(a for r in splits.values() for a in r.answers)
        qtypes = Counter(q for r in splits.values() for q in r.qtypes)
        clients[name] = {
            "sizes": {s: len(r) for s, r in splits.items()},
            "images": images[name] if images else {s: int(len(r.images)) for s, r in splits.items()},
            "answers": dict(sorted(answers.items())),
            "qtypes": dict(sorted(qtypes.items())),
            "label_space": len(label_space(splits["train"].task, splits["train"])),
            "task": splits["train"].task,
        }
    answer_js = _pairwise({n: c["answers"] for n, c in clients.items()})
    qtype_js = _pairwise({n: c["qtypes"] for n, c in clients.items()})
    return {
        "clients": clients,
        "divergence": {
            "answers_js": answer_js,
            "qtypes_js": qtype_js,
            "mean_answers_js": _mean_off_diagonal(answer_js),
            "mean_qtypes_js": _mean_off_diagonal(qtype_js),
        },
    }


def stats_table(stats: dict) -> str:
    """The stats as a markdown table: one row per client, then the pairwise divergences."""
    names = list(stats["clients"])
    lines = ["| client | train | val | test | label space | top answers | question types |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        c = stats["clients"][n]
        total = sum(c["answers"].values())
        top = ", ".join(f"{a} {v / total:.2f}" for a, v in Counter(c["answers"]).most_common(3))
        qt = sum(c["qtypes"].values())
        types = ", ".join(f"{q} {v / qt:.2f}" for q, v in c["qtypes"].items())
        s = c["sizes"]
        lines.append(f"| {n} | {s['train']} | {s['val']} | {s['test']} | {c['label_space']} | {top} | {types} |")
    d = stats["divergence"]
    lines += ["", "Pairwise Jensen-Shannon divergence (base 2) of answer distributions (upper triangle) and of "
              "question-type distributions (lower triangle):", "",
              "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, a in enumerate(names):
        cells = [("-" if i == j else f"{d['answers_js'][a][b]:.3f}" if j > i else f"{d['qtypes_js'][a][b]:.3f}")
                 for j, b in enumerate(names)]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean over client pairs: answers {d['mean_answers_js']:.3f}, question types "
              f"{d['mean_qtypes_js']:.3f}."]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def sample_sheet(r: Records, n: int = SAMPLES) -> Image.Image:
    """The first `n` test records of a client: image, question and answer, in a grid."""
    font = ImageFont.load_default()
    side = min(r.images.shape[1], 48) * SCALE  # real datasets' larger images are drawn at the same size
    line_h = 11
    cell_w, cell_h = side + 16, side + 8 + TEXT_ROWS * line_h
    n = min(n, len(r))
    rows = -(-n // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k in range(n):
        x, y = (k % COLUMNS) * cell_w + 8, (k // COLUMNS) * cell_h + 4
        if r.image_index2 is not None:  # an image pair: the two side by side, each half as wide
            for j, i in enumerate((r.image_index[k], r.image_index2[k])):
                half = Image.fromarray(r.images[i]).resize((side // 2 - 1, side // 2 - 1), Image.NEAREST)
                sheet.paste(half, (x + j * (side // 2), y + side // 4))
        else:
            sheet.paste(Image.fromarray(r.images[r.image_index[k]]).resize((side, side), Image.NEAREST), (x, y))
        question = r.questions[k]
        if r.candidates is not None:  # multiple choice: the candidates after the question
            question += " | " + " / ".join(r.candidates[k])
        text = _wrap(question, side // 6)[:TEXT_ROWS - 1] + [f"-> {r.answers[k]}"]
        for i, line in enumerate(text):
            draw.text((x, y + side + 2 + i * line_h), line, fill=(0, 0, 0) if i < len(text) - 1 else (0, 90, 200),
                      font=font)
    return sheet


def benchmark_sheet(records: dict[str, dict[str, Records]], per_client: int = COLUMNS) -> Image.Image:
    """One sheet for a whole benchmark: a row of `per_client` test samples per client, named on the left."""
    font = ImageFont.load_default()
    rows = [(name, sample_sheet(splits["test"], per_client)) for name, splits in records.items()]
    label_w = 90
    sheet = Image.new("RGB", (label_w + max(r.width for _, r in rows), sum(r.height for _, r in rows)),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, row in rows:
        sheet.paste(row, (label_w, y))
        draw.text((6, y + row.height // 2 - 6), name, fill=(0, 0, 0), font=font)
        y += row.height
    return sheet


def write_report(benchmark: str, out_dir: Path, seed: int = 0, sizes: Sizes = Sizes(),
                 cache_dir: Path | None = None, records: dict[str, dict[str, Records]] | None = None) -> dict:
    """DIR/samples_<client>.png, DIR/samples.png (a few of every client's) and DIR/stats.json for a benchmark
    (of `records` where given, e.g. read from the real datasets by feddat.data.real); returns the stats."""
    if records is None:
        records = client_records(benchmark, seed, sizes, cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, splits in records.items():
        sample_sheet(splits["test"]).save(out_dir / f"samples_{name}.png", optimize=True)
    benchmark_sheet(records).save(out_dir / "samples.png", optimize=True)
    stats = {"benchmark": benchmark, "seed": seed, **benchmark_stats(records)}
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


# ----- client folders (feddat.data.folders) -----
UNSEEN = "(not a training answer)"


def split_records(split, answers: list[str], task: str, with_images: int = 0) -> Records:
    """A client folder's split (feddat.data.lazy.LazySplit) as Records for the stats and sheets: every item's
    question, answer (from its label) and type; the images of its first `with_images` items only (decoded now),
    so a large folder is not decoded to describe it."""
    labels = split.labels
    if labels.dim() == 2:  # VQA soft scores: the best-scored answer (-1: none of the training answers)
        labels = torch.where(labels.max(dim=1).values > 0, labels.argmax(dim=1), -1)
    labels = labels.tolist()
    if task == "choice":
        said = [split.candidates[k][i] for k, i in enumerate(labels)]
    else:
        said = [answers[i] if i >= 0 else UNSEEN for i in labels]
    n = min(with_images, len(labels))
    firsts = split.image_index[:n].tolist()
    seconds = split.image_index2[:n].tolist() if split.image_index2 is not None else []
    used = sorted(set(firsts + seconds))
    size = split.images.size
    images = split.images.load(used) if used else np.zeros((0, size, size, 3), np.uint8)
    where = {img: i for i, img in enumerate(used)}
    return Records(images=np.asarray(images), patch_colors=np.zeros((len(used), 0), np.int64),
                   patch_shapes=np.zeros((len(used), 0), np.int64),
                   image_index=np.array([where[i] for i in firsts], dtype=np.int64),
                   questions=list(split.questions), answers=said, qtypes=[str(q) for q in split.qtypes], shifted=[],
                   synonym=[], task=task,
                   image_index2=np.array([where[i] for i in seconds], dtype=np.int64) if seconds else None,
                   candidates=list(split.candidates) if split.candidates is not None else None)


def write_folder_report(clients, out_dir: Path, where: str) -> dict:
    """DIR/samples_<client>.png, DIR/samples.png and DIR/stats.json for loaded client folders
    (feddat.data.folders.FolderClient), as `write_report` writes them for a benchmark; returns the stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records, images = {}, {}
    for c in clients:
        splits = {"train": c.train, "val": c.val, "test": c.test}
        records[c.name] = {s: split_records(sp, c.answers, c.task, SAMPLES if s == "test" else 0)
                           for s, sp in splits.items()}
        images[c.name] = {s: int(len(sp.pixels)) for s, sp in splits.items()}
        sample_sheet(records[c.name]["test"]).save(out_dir / f"samples_{c.name}.png", optimize=True)
    benchmark_sheet(records).save(out_dir / "samples.png", optimize=True)
    stats = {"clients_dir": where, **benchmark_stats(records, images)}
    for c in clients:
        stats["clients"][c.name]["label_space"] = len(c.answers)
        if getattr(c, "report", None) is not None:
            stats["clients"][c.name]["loaded"] = c.report.summary()
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
