"""Readers for the real datasets: each dataset's published format, written small into tmp_path, read back exactly;
the paper's preprocessing (top-k answers, seeded subsampling); errors naming the file and the record; the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feddat.cli import main
from feddat.data.real import (CLOVE_FUNCTION, CLOVE_SCENE, REAL_BENCHMARKS, Example, client_examples, example_json,
                              load_aqua, load_clove_function, load_clove_scene, load_cocoqa, load_gqa, load_nlvr2,
                              load_real_benchmark, load_snli_ve, load_vcr, load_vizwiz, load_vqa_abstract,
                              load_vqav2, top_answers)
from feddat.data.sizes import Sizes
from feddat.errors import FedDATError

SIDE = 16


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (SIDE, SIDE), (value, 255 - value, 40)).save(path)


def _json(path: Path, blob) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(blob))


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _images(data_dir: Path, examples: list[Example]) -> None:
    for k, e in enumerate(examples):
        for j, rel in enumerate(e.images):
            if not (data_dir / rel).exists():
                _image(data_dir / rel, 20 * k + 5 * j)


# --- fixtures, one per dataset, in the dataset's own layout; each returns the Examples it should read as ------

def make_vqa_format(data_dir: Path, dataset: str, split: str, rows, questions_file: str, annotations_file: str,
                    image: str) -> list[Example]:
    """rows: (question_id, image_id, question, multiple_choice_answer, ten answers, answer_type)."""
    root = data_dir / dataset
    _json(root / questions_file, {"info": {}, "task_type": "Open-Ended", "data_subtype": split, "license": {},
                                  "questions": [{"image_id": i, "question": q, "question_id": qid}
                                                for qid, i, q, *_ in rows]})
    _json(root / annotations_file, {"info": {}, "data_subtype": split, "license": {}, "annotations": [
        {"question_type": "what", "multiple_choice_answer": mc, "image_id": i, "answer_type": t, "question_id": qid,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(ans)]}
        for qid, i, q, mc, ans, t in rows]})
    out = [Example(str(qid), (image.format(i=i),), q, mc, tuple(ans), (), t) for qid, i, q, mc, ans, t in rows]
    _images(data_dir, out)
    return out


VQA_ROWS = {
    "train": [(1, 9, "What color is the bus?", "red", ["red"] * 8 + ["orange", "red"], "other"),
              (2, 9, "Is the bus moving?", "yes", ["yes"] * 9 + ["no"], "yes/no"),
              (3, 25, "How many dogs are there?", "2", ["2"] * 6 + ["3"] * 4, "number")],
    "test": [(4, 42, "What color is the car?", "red", ["red"] * 5 + ["maroon"] * 5, "other"),
             (5, 43, "How many people?", "2", ["2"] * 10, "number")],
}


def make_vqav2(data_dir: Path) -> dict[str, list[Example]]:
    return {part: make_vqa_format(data_dir, "vqav2", split, VQA_ROWS[part],
                                  f"v2_OpenEnded_mscoco_{split}_questions.json",
                                  f"v2_mscoco_{split}_annotations.json",
                                  f"vqav2/{split}/COCO_{split}_{{i:012d}}.jpg")
            for part, split in (("train", "train2014"), ("test", "val2014"))}


def make_vqa_abstract(data_dir: Path) -> dict[str, list[Example]]:
    return {part: make_vqa_format(data_dir, "vqa-abstract", split, VQA_ROWS[part],
                                  f"OpenEnded_abstract_v002_{split}_questions.json",
                                  f"abstract_v002_{split}_annotations.json",
                                  f"vqa-abstract/scene_img_abstract_v002_{split}/abstract_v002_{split}_{{i:012d}}.png")
            for part, split in (("train", "train2015"), ("test", "val2015"))}


def make_gqa(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [("201", "n1", "Is the cup on the table?", "yes", "verify"),
                      ("202", "n1", "What is on the table?", "cup", "query"),
                      ("203", "n7", "Is the man left or right of the car?", "left", "choose")],
            "testdev": [("301", "n9", "What is on the saucer?", "cup", "query"),
                        ("302", "n9", "Is there a car?", "yes", "verify")]}
    out = {}
    for split, rs in rows.items():
        _json(data_dir / "gqa" / f"{split}_balanced_questions.json",
              {qid: {"semantic": [], "entailed": [], "equivalent": [qid], "question": q, "imageId": img,
                     "isBalanced": True, "groups": {"global": None, "local": "x"}, "answer": a,
                     "semanticStr": "", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                     "types": {"detailed": "d", "semantic": "rel", "structural": t}, "fullAnswer": "It is."}
               for qid, img, q, a, t in rs})
        out["test" if split == "testdev" else split] = [Example(qid, (f"gqa/images/{img}.jpg",), q, a, (), (), t)
                                                       for qid, img, q, a, t in rs]
        _images(data_dir, out["test" if split == "testdev" else split])
    return out


def make_vizwiz(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [(0, "What is this?", ["Basil"] * 6 + ["herbs"] * 4, "other", 1),
                      (1, "Can you tell me what this is?", ["unanswerable"] * 10, "unanswerable", 0),
                      (2, "What color is this shirt?", ["blue"] * 3 + ["navy"] * 3 + ["dark blue"] * 4, "other", 1),
                      (3, "Is the light on?", ["yes"] * 7 + ["no"] * 3, "yes/no", 1)],
            "val": [(0, "What flavor is this?", ["basil"] * 10, "other", 1),
                    (1, "Is it on?", ["no"] * 4 + ["yes"] * 6, "yes/no", 1)]}
    out = {}
    for split, rs in rows.items():
        name = lambda k: f"VizWiz_{split}_{k:08d}.jpg"  # noqa: E731
        _json(data_dir / "vizwiz" / "Annotations" / f"{split}.json",
              [{"image": name(k), "question": q, "answers": [{"answer": a, "answer_confidence": "yes"} for a in ans],
                "answer_type": t, "answerable": ok} for k, q, ans, t, ok in rs])
        ex = []
        for k, q, ans, t, ok in rs:
            if ok:
                lower = tuple(a.lower() for a in ans)
                ex.append(Example(name(k)[:-4], (f"vizwiz/{split}/{name(k)}",), q,
                                  max(lower, key=lower.count), lower, (), t))
        out["test" if split == "val" else split] = ex
        _images(data_dir, ex)
    return out


def make_cocoqa(data_dir: Path, n_train: int = 3) -> dict[str, list[Example]]:
    words = ["cat", "dog", "two", "red"]
    types = [0, 0, 1, 2]
    rows = {"train": [(f"what is on the sofa number {k} ?", words[k % 4], 100 + k // 2, types[k % 4])
                      for k in range(n_train)],
            "test": [("what is sleeping on the bed ?", "cat", 500, 0), ("how many plates are there ?", "two", 501, 1)]}
    out = {}
    for split, rs in rows.items():
        root = data_dir / "cocoqa" / split
        root.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(("questions.txt", "answers.txt", "img_ids.txt", "types.txt")):
            (root / name).write_text("".join(f"{r[i]}\n" for r in rs))
        coco = "train2014" if split == "train" else "val2014"
        out[split] = [Example(f"{split}-{n}", (f"cocoqa/{coco}/COCO_{coco}_{img:012d}.jpg",), q, a, (), (),
                              ["object", "number", "color", "location"][t]) for n, (q, a, img, t) in enumerate(rs, 1)]
        _images(data_dir, out[split])
    return out


def make_aqua(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [("23361-01lucret.jpg", "who was portrayed as a symbol of purity", "Lucretia", True),
                      ("42809-3baptist.jpg", "what stand next to each other", "people", False),
                      ("42809-3baptist.jpg", "who is holding the lamb", "Lucretia", True)],
            "test": [("10001-1portra.jpg", "what is the woman holding", "people", False),
                     ("10002-2portra.jpg", "who painted this for the church", "lucretia", True)]}
    out = {}
    for split, rs in rows.items():
        _json(data_dir / "aqua" / f"{split}.json", [{"image": img, "question": q, "answer": a,
                                                     "need_external_knowledge": k} for img, q, a, k in rs])
        out[split] = [Example(f"{split}-{i}", (f"aqua/SemArt/Images/{img}",), q, a.lower(), (), (),
                              "knowledge" if k else "visual") for i, (img, q, a, k) in enumerate(rs)]
        _images(data_dir, out[split])
    return out


def _clove_rows(tag: str) -> dict[str, list]:
    return {"train": [(f"g{tag}1", "2370", "vg", "What place is this?", "kiosk", ["kiosk"] * 10, "place"),
                      (f"g{tag}2", "2370", "vg", "Who is behind the counter?", "lady", ["lady"] * 10, "relS"),
                      (f"t{tag}3", "0054", "textvqa", "What brand is it?", "nike", ["nike"] * 7 + ["adidas"] * 3,
                       None)],
            "val": [(f"g{tag}4", "2371", "vg", "What place is it?", "kiosk", ["kiosk"] * 10, "place"),
                    (f"t{tag}5", "0055", "textvqa", "What does the sign say?", "nike", ["nike"] * 10, None)]}


def make_clove(data_dir: Path, folder: str, file_stem: str, tag: str, stage: str) -> dict[str, list[Example]]:
    out = {}
    for split, rs in _clove_rows(tag).items():
        records = []
        for qid, img, source, q, a, ans, detailed in rs:
            rec = {"answer": a, "answers": ans, "feature_path": f"{img}.npy", "image_id": img, "image_source": source,
                   "ocr": [], "ocr_info": [], "ocr_tokens": [], "gt_scene_graph_seq": [], "question": q,
                   "question_id": qid, "set_name": split, "stage": stage, "supporting_fact": []}
            if detailed:
                rec["raw_question_type"] = {"detailed": detailed, "semantic": "global", "structural": "query"}
            records.append(rec)
        _json(data_dir / "clove" / "json" / folder / f"{file_stem}_{split}.json", records)
        images = {"vg": "clove/vg/image", "textvqa": "clove/textvqa"}
        out["test" if split == "val" else split] = ex = [
            Example(qid, (f"{images[source]}/{img}.jpg",), q, a, tuple(ans), (), detailed or stage)
            for qid, img, source, q, a, ans, detailed in rs]
        _images(data_dir, ex)
    return out


def make_clove_function(data_dir: Path, subset: str) -> dict[str, list[Example]]:
    name = CLOVE_FUNCTION[subset]
    return make_clove(data_dir, "function", f"functional_{name}", f"f{subset}", name)


def make_clove_scene(data_dir: Path, subset: str) -> dict[str, list[Example]]:
    return make_clove(data_dir, "scene", f"scene_{subset}#{CLOVE_SCENE[subset]}", f"s{subset}", f"{subset}")


def make_nlvr2(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [("train-10171-0-0", 5, "The left image contains twice the dogs of the right image.", "True"),
                      ("train-10171-0-1", 5, "Each image shows exactly one dog.", "False"),
                      ("train-2112-1-0", 12, "There are two birds in total.", "True")],
            "test1": [("test1-0-0-0", None, "One image has a red car.", "False"),
                      ("test1-0-1-0", None, "Both images show trucks.", "True")]}
    out = {}
    for split, rs in rows.items():
        lines = []
        for ident, directory, sentence, label in rs:
            rec = {"validation": {}, "sentence": sentence, "left_url": "http://x/l.jpg", "writer": "w1",
                   "label": label, "right_url": "http://x/r.jpg", "synset": "n0", "query": "dogs",
                   "identifier": ident, "extra_validations": {}}
            if directory is not None:
                rec["directory"] = directory
            lines.append(rec)
        _jsonl(data_dir / "nlvr2" / "data" / f"{split}.json", lines)
        ex = []
        for ident, directory, sentence, label in rs:
            folder = f"nlvr2/images/{split}" + (f"/{directory}" if directory is not None else "")
            prefix = ident.rsplit("-", 1)[0]
            ex.append(Example(ident, (f"{folder}/{prefix}-img0.png", f"{folder}/{prefix}-img1.png"), sentence,
                              label.lower(), (), (), "nlvr2"))
        out["test" if split == "test1" else split] = ex
        _images(data_dir, ex)
    return out


def make_snli_ve(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [("3416050480.jpg#4r1e", "3416050480.jpg", "A man is outside.", "entailment"),
                      ("3416050480.jpg#4r1n", "3416050480.jpg", "A man is asleep.", "-"),
                      ("3416050480.jpg#4r1c", "3416050480.jpg", "Nobody is there.", "contradiction"),
                      ("2267923837.jpg#2r1n", "2267923837.jpg", "The kids are siblings.", "neutral")],
            "test": [("1000.jpg#0r1e", "1000.jpg", "A dog runs.", "entailment"),
                     ("1001.jpg#0r1c", "1001.jpg", "A cat sleeps.", "contradiction")]}
    out = {}
    for split, rs in rows.items():
        _jsonl(data_dir / "snli-ve" / f"snli_ve_{split}.jsonl",
               [{"annotator_labels": [g], "captionID": f"{img}#4", "gold_label": g, "pairID": pid,
                 "sentence1": "A caption.", "sentence1_binary_parse": "", "sentence1_parse": "", "sentence2": s,
                 "sentence2_binary_parse": "", "sentence2_parse": "", "Flikr30kID": img} for pid, img, s, g in rs])
        out[split] = ex = [Example(pid, (f"snli-ve/flickr30k-images/{img}",), s, g, (), (), "snli-ve")
                           for pid, img, s, g in rs if g != "-"]
        _images(data_dir, ex)
    return out


VCR_OBJECTS = ["person", "person", "dog"]


def _vcr_record(annot_id: str, img_fn: str, label: int) -> dict:
    return {"movie": "3015_CHARLIE_ST_CLOUD", "objects": VCR_OBJECTS, "interesting_scores": [0], "answer_likelihood":
            "likely", "img_fn": img_fn, "metadata_fn": img_fn.replace(".jpg", ".json"), "answer_orig": "x",
            "question_orig": "x", "rationale_orig": "x", "question": ["What", "is", [0], "doing", "?"],
            "answer_match_iter": [0, 1, 2], "answer_sources": [1, 2, 3, 4], "answer_choices": [
                [[0], "is", "walking", [2], "."],
                [[0, 1], "are", "talking", "."],
                [[2], "'s", "owner", "is", "asleep", "."],
                ["Nobody", "is", "there", "."]],
            "answer_label": label, "rationale_choices": [], "rationale_label": 0, "annot_id": annot_id,
            "question_number": 0}


VCR_CANDIDATES = ("person is walking dog.", "person and person are talking.", "dog's owner is asleep.",
                  "Nobody is there.")


def make_vcr(data_dir: Path) -> dict[str, list[Example]]:
    rows = {"train": [("train-0", "lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935@0.jpg", 0),
                      ("train-1", "lsmdc_3015_CHARLIE_ST_CLOUD/3015_CHARLIE_ST_CLOUD_00.23.57.935@0.jpg", 2),
                      ("train-2", "movieclips_A_Fistful_of_Dollars/TCdC4ixhmEo@12.jpg", 1)],
            "val": [("val-0", "movieclips_Gandhi/Vf6j0yZ5ZdE@3.jpg", 3),
                    ("val-1", "movieclips_Gandhi/Vf6j0yZ5ZdE@4.jpg", 1)]}
    out = {}
    for split, rs in rows.items():
        _jsonl(data_dir / "vcr" / f"{split}.jsonl", [_vcr_record(a, img, lab) for a, img, lab in rs])
        out["test" if split == "val" else split] = ex = [
            Example(a, (f"vcr/vcr1images/{img}",), "What is person doing?", VCR_CANDIDATES[lab], (), VCR_CANDIDATES,
                    "vcr") for a, img, lab in rs]
        _images(data_dir, ex)
    return out


# --- each loader reads its format exactly ---------------------------------------------------------------------

def test_vqav2_reads_questions_annotations_and_coco_image_names(tmp_path):
    want = make_vqav2(tmp_path)
    assert load_vqav2(tmp_path, "train2014") == want["train"]
    assert load_vqav2(tmp_path, "val2014") == want["test"]
    assert want["train"][0].images == ("vqav2/train2014/COCO_train2014_000000000009.jpg",)
    assert want["train"][0].annotator_answers == ("red",) * 8 + ("orange", "red")


def test_vqa_abstract_reads_the_abstract_v002_files(tmp_path):
    want = make_vqa_abstract(tmp_path)
    assert load_vqa_abstract(tmp_path, "train2015") == want["train"]
    assert load_vqa_abstract(tmp_path, "val2015") == want["test"]
    assert want["test"][0].images == ("vqa-abstract/scene_img_abstract_v002_val2015/"
                                      "abstract_v002_val2015_000000000042.png",)


def test_gqa_reads_balanced_questions_keyed_by_id(tmp_path):
    want = make_gqa(tmp_path)
    assert load_gqa(tmp_path, "train") == want["train"]
    assert load_gqa(tmp_path, "testdev") == want["test"]
    assert [e.qtype for e in want["train"]] == ["verify", "query", "choose"]


def test_vizwiz_keeps_answerable_questions_with_the_majority_answer(tmp_path, caplog):
    want = make_vizwiz(tmp_path)
    with caplog.at_level(logging.INFO, logger="feddat"):
        got = load_vizwiz(tmp_path, "train")
    assert got == want["train"]
    assert [e.answer for e in got] == ["basil", "dark blue", "yes"]
    assert "dropped 1 of 4 questions marked unanswerable" in caplog.text
    assert len(load_vizwiz(tmp_path, "train", keep_unanswerable=True)) == 4
    assert load_vizwiz(tmp_path, "val") == want["test"]


def test_cocoqa_reads_the_four_parallel_text_files(tmp_path):
    want = make_cocoqa(tmp_path)
    assert load_cocoqa(tmp_path, "train") == want["train"]
    assert load_cocoqa(tmp_path, "test") == want["test"]
    assert want["test"][1] == Example("test-2", ("cocoqa/val2014/COCO_val2014_000000000501.jpg",),
                                      "how many plates are there ?", "two", (), (), "number")


def test_aqua_reads_semart_image_names_and_lowercases_answers(tmp_path):
    want = make_aqua(tmp_path)
    assert load_aqua(tmp_path, "train") == want["train"]
    assert load_aqua(tmp_path, "test") == want["test"]
    assert want["train"][0].answer == "lucretia" and want["train"][0].qtype == "knowledge"


def test_clove_function_and_scene_read_their_split_files(tmp_path):
    want_f = make_clove_function(tmp_path, "c")
    want_s = make_clove_scene(tmp_path, "a")
    assert load_clove_function(tmp_path, "train", "c") == want_f["train"]
    assert load_clove_function(tmp_path, "val", "c") == want_f["test"]
    assert load_clove_scene(tmp_path, "train", "a") == want_s["train"]
    assert (tmp_path / "clove/json/scene/scene_a#ShopAndDining_val.json").exists()
    assert want_f["train"][2].images == ("clove/textvqa/0054.jpg",) and want_f["train"][2].qtype == "logical"
    with pytest.raises(FedDATError, match="no subset 'f'"):
        load_clove_function(tmp_path, "train", "f")


def test_nlvr2_reads_image_pairs_from_the_identifier(tmp_path):
    want = make_nlvr2(tmp_path)
    got = load_nlvr2(tmp_path, "train")
    assert got == want["train"]
    assert got[0].images == ("nlvr2/images/train/5/train-10171-0-img0.png",
                             "nlvr2/images/train/5/train-10171-0-img1.png")
    assert [e.answer for e in got] == ["true", "false", "true"]
    assert load_nlvr2(tmp_path, "test1") == want["test"]


def test_snli_ve_reads_hypotheses_and_drops_pairs_without_gold_label(tmp_path, caplog):
    want = make_snli_ve(tmp_path)
    with caplog.at_level(logging.INFO, logger="feddat"):
        assert load_snli_ve(tmp_path, "train") == want["train"]
    assert "dropped 1 pairs without a gold label" in caplog.text
    assert [e.answer for e in want["train"]] == ["entailment", "contradiction", "neutral"]


def test_vcr_resolves_object_references_and_picks_the_labelled_candidate(tmp_path):
    want = make_vcr(tmp_path)
    got = load_vcr(tmp_path, "train")
    assert got == want["train"]
    assert got[0].text == "What is person doing?"
    assert got[0].candidates == VCR_CANDIDATES
    assert [e.answer for e in got] == ["person is walking dog.", "dog's owner is asleep.",
                                       "person and person are talking."]


# --- errors ---------------------------------------------------------------------------------------------------

def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FedDATError, match=r"missing file .*v2_OpenEnded_mscoco_train2014_questions\.json"):
        load_vqav2(tmp_path, "train2014")
    make_cocoqa(tmp_path)
    (tmp_path / "cocoqa/train/types.txt").unlink()
    with pytest.raises(FedDATError, match=r"missing file .*cocoqa/train/types\.txt"):
        load_cocoqa(tmp_path, "train")


def test_a_malformed_record_names_file_and_record(tmp_path):
    make_nlvr2(tmp_path)
    path = tmp_path / "nlvr2/data/train.json"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"False"', '"Maybe"')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FedDATError) as e:
        load_nlvr2(tmp_path, "train")
    assert str(path) in str(e.value) and "line 2 (record train-10171-0-1)" in str(e.value)
    assert "'Maybe' is neither True nor False" in str(e.value)


def test_a_vcr_answer_label_out_of_range_is_an_error_not_a_guess(tmp_path):
    make_vcr(tmp_path)
    _jsonl(tmp_path / "vcr/train.jsonl", [_vcr_record("train-0", "a/b.jpg", 4)])
    with pytest.raises(FedDATError, match=r"vcr/train\.jsonl: line 1 \(record train-0\): answer_label 4 is out of "):
        load_vcr(tmp_path, "train")
    _jsonl(tmp_path / "vcr/train.jsonl", [{**_vcr_record("train-0", "a/b.jpg", 0), "question": ["Is", [5], "?"]}])
    with pytest.raises(FedDATError, match=r"refers to object \[5\], but the record has 3 objects"):
        load_vcr(tmp_path, "train")


def test_a_vqa_question_without_annotation_is_named(tmp_path):
    make_vqav2(tmp_path)
    path = tmp_path / "vqav2/v2_mscoco_train2014_annotations.json"
    blob = json.loads(path.read_text())
    blob["annotations"] = blob["annotations"][:2]
    path.write_text(json.dumps(blob))
    with pytest.raises(FedDATError, match=r"v2_OpenEnded_mscoco_train2014_questions\.json: record 3: no annotation"):
        load_vqav2(tmp_path, "train2014")


def test_an_unreadable_image_names_file_and_record(tmp_path):
    make_vcr(tmp_path)
    broken = tmp_path / "vcr/vcr1images/movieclips_A_Fistful_of_Dollars/TCdC4ixhmEo@12.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(FedDATError) as e:
        load_real_benchmark("task", tmp_path, 0, Sizes(2, 1, 2), SIDE, clients=["vcr"], progress=False)
    assert str(broken) in str(e.value) and "record train-2" in str(e.value) and "unreadable image" in str(e.value)


def test_skip_bad_skips_and_counts_bad_records_and_images(tmp_path, caplog):
    make_nlvr2(tmp_path)
    path = tmp_path / "nlvr2/data/train.json"
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"True"', '"yes"')
    path.write_text("\n".join(lines + ["{not json"]) + "\n")
    with caplog.at_level(logging.INFO, logger="feddat"):
        got = load_nlvr2(tmp_path, "train", skip_bad=True)
    assert [e.id for e in got] == ["train-10171-0-1", "train-2112-1-0"]
    assert f"skipped 2 bad records in {path}" in caplog.text

    (tmp_path / "nlvr2/images/train/12/train-2112-1-img1.png").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="feddat"):
        recs = load_real_benchmark("task", tmp_path, 0, Sizes(5, 1, 2), SIDE, skip_bad=True, clients=["nlvr2"],
                                   progress=False)["nlvr2"]
    assert recs["train"].ids == ["train-10171-0-1"] and len(recs["val"]) == 0
    assert "skipped 1 bad record in nlvr2 train images (first: " in caplog.text
    assert "train-2112-1-img1.png: record train-2112-1-0: missing image file" in caplog.text
    assert "only 1 train questions available (asked for 5)" in caplog.text


# --- preprocessing and records --------------------------------------------------------------------------------

def test_top_k_keeps_the_most_frequent_training_answers_in_both_pools(tmp_path, caplog):
    make_cocoqa(tmp_path, n_train=7)  # answers: cat dog two red cat dog two
    assert top_answers(load_cocoqa(tmp_path, "train"), 3) == ["cat", "dog", "two"]
    domain = dict((c.name, c) for c in REAL_BENCHMARKS["domain"])
    with caplog.at_level(logging.INFO, logger="feddat"):
        pools = client_examples(domain["toronto"], tmp_path, seed=0, index=3, top_k=2)
    assert sorted(e.answer for e in pools["train"]) == ["cat", "cat", "dog", "dog"]
    assert [e.answer for e in pools["test"]] == ["cat"]
    assert "toronto: kept 4 of 7 train and 1 of 2 test questions" in caplog.text


def test_subsampling_is_deterministic_by_seed_with_val_held_out_of_train(tmp_path):
    make_cocoqa(tmp_path, n_train=40)
    sizes = Sizes(10, 5, 2)
    a = load_real_benchmark("domain", tmp_path, 3, sizes, SIDE, clients=["toronto"], progress=False)["toronto"]
    b = load_real_benchmark("domain", tmp_path, 3, sizes, SIDE, clients=["toronto"], progress=False)["toronto"]
    c = load_real_benchmark("domain", tmp_path, 4, sizes, SIDE, clients=["toronto"], progress=False)["toronto"]
    assert [len(a[s]) for s in ("train", "val", "test")] == [10, 5, 2]
    assert all(a[s].ids == b[s].ids for s in a)
    assert np.array_equal(a["train"].images, b["train"].images)
    assert a["train"].ids != c["train"].ids
    assert not set(a["train"].ids) & set(a["val"].ids)
    assert all(i.startswith("train-") for i in a["train"].ids + a["val"].ids)
    assert all(i.startswith("test-") for i in a["test"].ids)


def test_records_decode_each_image_once_and_fill_the_task_fields(tmp_path):
    make_vqav2(tmp_path)
    make_nlvr2(tmp_path)
    make_vcr(tmp_path)
    recs = load_real_benchmark("task", tmp_path, 0, Sizes(2, 1, 2), SIDE, clients=["vqav2", "nlvr2", "vcr"],
                               progress=False)
    vqa = recs["vqav2"]
    image_of = {"1": 9, "2": 9, "3": 25, "4": 42, "5": 43}
    for split in ("train", "val", "test"):  # one stored image per distinct image of the split's questions
        assert len(vqa[split].images) == len({image_of[i] for i in vqa[split].ids})
    train_val = {i: (vqa[s], k) for s in ("train", "val") for k, i in enumerate(vqa[s].ids)}
    assert sorted(train_val) == ["1", "2", "3"]
    r, k = train_val["1"]
    assert r.annotator_answers[k] == ["red"] * 8 + ["orange", "red"] and r.answers[k] == "red"
    assert r.images.dtype == np.uint8 and r.images.shape[1:] == (SIDE, SIDE, 3)
    assert r.patch_colors.shape == (len(r.images), 16) and not r.patch_colors.any()
    assert vqa["test"].task == "vqa" and vqa["test"].candidates is None and vqa["test"].image_index2 is None

    pair = recs["nlvr2"]["test"]
    assert pair.task == "pair" and pair.image_index2 is not None and len(pair.images) == 4
    assert sorted(pair.answers) == ["false", "true"]
    first = pair.ids.index("test1-0-0-0")
    pixel = pair.images[pair.image_index[first]][0, 0]
    assert tuple(pixel) == (0, 255, 40)  # the PNG's colour, decoded exactly (RGB)
    assert tuple(pair.images[pair.image_index2[first]][0, 0]) == (5, 250, 40)

    choice = load_real_benchmark("task", tmp_path, 0, Sizes(3, 1, 2), SIDE, clients=["vcr"],
                                 progress=False)["vcr"]["train"]
    assert len(choice) == 3 and len(choice.images) == 2  # train-0 and train-1 share their image
    assert choice.task == "choice" and choice.candidates[0] == list(VCR_CANDIDATES)
    assert all(a in c for a, c in zip(choice.answers, choice.candidates))
    assert choice.annotator_answers is None


def test_benchmarks_name_their_clients_in_the_papers_order():
    assert [c.name for c in REAL_BENCHMARKS["domain"]] == ["aqua", "vqa-abstract", "vizwiz", "toronto", "gqa"]
    assert [c.name for c in REAL_BENCHMARKS["function"]] == ["attribute", "knowledge", "logical", "object",
                                                              "relation"]
    assert [c.name for c in REAL_BENCHMARKS["scene"]] == ["shop-and-dining", "workplace", "home-or-hotel",
                                                           "transportation", "sport-and-leisure", "outdoors"]
    assert [c.name for c in REAL_BENCHMARKS["task"]] == ["vqav2", "nlvr2", "snli-ve", "vcr"]
    with pytest.raises(FedDATError, match="no client nope"):
        load_real_benchmark("task", Path("."), 0, Sizes(), SIDE, clients=["nope"])


# --- the CLI: `feddat data --data-dir` writes the chosen records as JSON lines --------------------------------

MAKERS = {
    "domain": lambda d: {"aqua": make_aqua(d), "vqa-abstract": make_vqa_abstract(d), "vizwiz": make_vizwiz(d),
                         "toronto": make_cocoqa(d), "gqa": make_gqa(d)},
    "function": lambda d: {CLOVE_FUNCTION[k]: make_clove_function(d, k) for k in CLOVE_FUNCTION},
    "scene": lambda d: {c.name: make_clove_scene(d, c.subset) for c in REAL_BENCHMARKS["scene"]},
    "task": lambda d: {"vqav2": make_vqav2(d), "nlvr2": make_nlvr2(d), "snli-ve": make_snli_ve(d), "vcr": make_vcr(d)},
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("benchmark", list(MAKERS))
def test_cli_data_writes_every_clients_records(benchmark, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    want = MAKERS[benchmark](data)
    # sizes that take every fixture record: 3 training records (2 train + 1 val), 2 test records
    code = main(["data", "--benchmark", benchmark, "--data-dir", str(data), "--out", str(out), "--image-size", "16",
                 "--train-per-client", "2", "--val-per-client", "1", "--test-per-client", "2",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    assert set(want) == {c.name for c in REAL_BENCHMARKS[benchmark]}
    by_id = lambda rows: sorted(rows, key=lambda r: r["id"])  # noqa: E731
    for client, splits in want.items():
        folder = out / "records" / client
        got_train = _read_jsonl(folder / "train.jsonl") + _read_jsonl(folder / "val.jsonl")
        assert len(_read_jsonl(folder / "val.jsonl")) == 1
        assert by_id(got_train) == by_id([example_json(e) for e in splits["train"]])
        assert by_id(_read_jsonl(folder / "test.jsonl")) == by_id([example_json(e) for e in splits["test"]])
        assert (out / f"samples_{client}.png").exists()
    stats = json.loads((out / "stats.json").read_text())
    assert list(stats["clients"]) == [c.name for c in REAL_BENCHMARKS[benchmark]]
    assert all(c["sizes"] == {"train": 2, "val": 1, "test": 2} for c in stats["clients"].values())
    assert "records" in capsys.readouterr().out


def test_cli_data_reports_a_bad_record_and_skips_it_on_request(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    MAKERS["task"](data)
    _jsonl(data / "vcr/val.jsonl", [_vcr_record("val-0", "movieclips_Gandhi/Vf6j0yZ5ZdE@3.jpg", 3),
                                    _vcr_record("val-1", "movieclips_Gandhi/Vf6j0yZ5ZdE@4.jpg", 7)])
    args = ["data", "--benchmark", "task", "--data-dir", str(data), "--out", str(out), "--image-size", "16",
            "--train-per-client", "2", "--val-per-client", "1", "--test-per-client", "2"]
    assert main(args) == 2
    assert "vcr/val.jsonl: line 2 (record val-1): answer_label 7" in capsys.readouterr().err
    assert main(args + ["--skip-bad-records"]) == 0
    assert [r["id"] for r in _read_jsonl(out / "records/vcr/test.jsonl")] == ["val-0"]
    assert "skipped 1 bad record in" in capsys.readouterr().err
