"""Benchmark formats on small files written here: loading, scoring with known answers, and bad files."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_core.config import EvalConfig
from vlm_core.data.tokenizer import load_tokenizer, train_tokenizer
from vlm_core.eval.__main__ import main
from vlm_core.eval.formats import (
    FormatError,
    load_benchmark,
    mmbench,
    pope,
    score_benchmark,
    vqa,
)
from vlm_core.eval.formats.common import read_jsonl
from vlm_core.model.config import ModelConfig, VisionConfig
from vlm_core.model.vlm import VLM
from vlm_core.train.checkpoint import save_checkpoint


def write_image(path: Path, seed: int = 0, size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def png_base64(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- POPE -------------------------------------------------------------------------------------------


def pope_file(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    for i in range(3):
        write_image(images / f"img{i}.png", seed=i)
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    records = [
        {"question_id": i, "image": f"img{i % 3}.png", "text": f"Is there a thing {i}?", "label": label,
         "category": "adversarial" if i < 3 else "random"}
        for i, label in enumerate(labels)
    ]
    return write_jsonl(tmp_path / "pope.jsonl", records), images


def test_pope_scores_as_pope_evaluate_py(tmp_path: Path) -> None:
    questions, images = pope_file(tmp_path)
    cfg = EvalConfig(format="pope", questions=str(questions), images=str(images))
    items = load_benchmark(cfg)
    assert [item.reference for item in items] == ["yes", "no", "yes", "no", "yes", "no"]
    # Read as: yes, no (first sentence "No"), no ("not"), yes, yes (no negation word), no.
    answers = ["Yes, there is.", "No. But there is a cat.", "There is not a dog", "yes", "I see it", "no"]
    result = score_benchmark(cfg, items, answers)
    overall = result.metrics["overall"]
    assert (overall["tp"], overall["fp"], overall["tn"], overall["fn"]) == (2, 1, 2, 1)
    assert overall["accuracy"] == pytest.approx(4 / 6) and overall["yes_ratio"] == pytest.approx(3 / 6)
    assert overall["precision"] == pytest.approx(2 / 3) and overall["recall"] == pytest.approx(2 / 3)
    assert overall["f1"] == pytest.approx(2 / 3)
    assert result.report.skills == {"adversarial": pytest.approx(2 / 3), "random": pytest.approx(2 / 3)}
    assert result.report.overall == pytest.approx(4 / 6) and result.report.counts == {"adversarial": 3, "random": 3}


def test_pope_limit_per_subset_keeps_file_order(tmp_path: Path) -> None:
    questions, images = pope_file(tmp_path)
    items = load_benchmark(EvalConfig(format="pope", questions=str(questions), images=str(images), limit_per_skill=1))
    assert [item.id for item in items] == ["0", "3"]


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"question_id": 1, "image": "img0.png", "text": "q?"}, "label", "missing"),
        ({"question_id": 1, "image": "img0.png", "text": "q?", "label": "maybe"}, "label", "not 'yes' or 'no'"),
        ({"question_id": 1, "image": "../outside.png", "text": "q?", "label": "yes"}, "image", "outside the image folder"),
        ({"question_id": 1, "image": "/etc/passwd", "text": "q?", "label": "yes"}, "image", "outside the image folder"),
        ({"question_id": 1, "image": "nope.png", "text": "q?", "label": "yes"}, "image", "not found"),
        ({"question_id": 0, "image": "img0.png", "text": "q?", "label": "yes"}, "question_id", "appears twice"),
    ],
    ids=["missing_label", "bad_label", "escape", "absolute", "missing_image", "duplicate"],
)
def test_bad_pope_lines_name_file_line_and_field(tmp_path: Path, record: dict, field: str, problem: str) -> None:
    images = tmp_path / "images"
    write_image(images / "img0.png")
    write_image(tmp_path / "outside.png")
    good = {"question_id": 0, "image": "img0.png", "text": "q?", "label": "no"}
    questions = write_jsonl(tmp_path / "pope.jsonl", [good, record])
    with pytest.raises(FormatError, match=rf"pope\.jsonl:2: field '{field}':.*{problem}"):
        pope.load(questions, images)


@pytest.mark.parametrize(("module", "name"), [(pope, "POPE"), (vqa, "VQA")])
def test_question_files_need_an_image_folder_and_a_question(tmp_path: Path, module, name: str) -> None:
    questions = write_jsonl(tmp_path / "q.jsonl", [])
    with pytest.raises(FormatError, match=rf"q\.jsonl: {name} needs the image folder"):
        module.load(questions, None)
    with pytest.raises(FormatError, match=r"q\.jsonl: no questions in the file"):
        module.load(questions, tmp_path)


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    questions = tmp_path / "pope.jsonl"
    questions.write_text('{"question_id": 0}\n\n{"question_id": 1,\n', encoding="utf-8")
    with pytest.raises(FormatError, match=r"pope\.jsonl:3: invalid JSON"):
        list(read_jsonl(questions))


# --- MME --------------------------------------------------------------------------------------------


def mme_root(tmp_path: Path) -> Path:
    root = tmp_path / "MME"
    for stem, seed in (("a", 1), ("b", 2)):  # existence: images and question files side by side
        write_image(root / "existence" / f"{stem}.png", seed)
        (root / "existence" / f"{stem}.txt").write_text("Is there a cat?\tYes\nIs there a dog?\tNo\n", encoding="utf-8")
    write_image(root / "artwork" / "images" / "c.jpg", 3)  # artwork: images/ and questions_answers_YN/
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "c.txt").write_text("Is it by Monet?\tYes\nIs it by Dali?\tNo\n")
    (root / "code_reasoning").mkdir()
    write_image(root / "code_reasoning" / "d.png", 4)
    (root / "code_reasoning" / "d.txt").write_text("Does it print 3?\tNo\nDoes it print 4?\tYes\n")
    return root


def test_mme_scores_acc_plus_acc_plus_per_subtask(tmp_path: Path) -> None:
    cfg = EvalConfig(format="mme", questions=str(mme_root(tmp_path)))
    items = load_benchmark(cfg)
    assert [item.id for item in items][:2] == ["artwork/c/1", "artwork/c/2"]
    by_id = {
        "artwork/c/1": "Yes", "artwork/c/2": "no, it is not",  # both right
        "code_reasoning/d/1": "yes", "code_reasoning/d/2": "Yes",  # one right
        "existence/a/1": "yes", "existence/a/2": "No",  # image a: both right
        "existence/b/1": "maybe", "existence/b/2": "no",  # image b: "maybe" reads as "other": one right
    }
    result = score_benchmark(cfg, items, [by_id[item.id] for item in items])
    subtasks = result.metrics["subtasks"]
    assert subtasks["artwork"]["score"] == pytest.approx(200.0)
    assert (subtasks["existence"]["acc"], subtasks["existence"]["acc_plus"]) == (pytest.approx(75.0), pytest.approx(50.0))
    assert subtasks["code_reasoning"]["score"] == pytest.approx(50.0 + 0.0)
    assert result.metrics["totals"] == {"perception": pytest.approx(325.0), "cognition": pytest.approx(50.0), "other": 0}
    assert result.report.skills["existence"] == pytest.approx(125 / 200)


def test_mme_limit_keeps_both_questions_of_an_image(tmp_path: Path) -> None:
    items = load_benchmark(EvalConfig(format="mme", questions=str(mme_root(tmp_path)), limit_per_skill=1))
    assert [item.id for item in items if item.subset == "existence"] == ["existence/a/1", "existence/a/2"]


@pytest.mark.parametrize(
    ("content", "field", "problem"),
    [("Is there a cat?\tYes\tExtra\n", "answer", "got 3 column"), ("Is there a cat?\tMaybe\n", "answer", "not Yes or No"),
     ("\tYes\n", "question", "empty question")],
)
def test_bad_mme_files_name_file_line_and_field(tmp_path: Path, content: str, field: str, problem: str) -> None:
    root = tmp_path / "MME"
    write_image(root / "color" / "x.png")
    (root / "color" / "x.txt").write_text("Is it red?\tNo\n" + content, encoding="utf-8")
    with pytest.raises(FormatError, match=rf"x\.txt:2: field '{field}':.*{problem}"):
        load_benchmark(EvalConfig(format="mme", questions=str(root)))


def test_mme_question_file_without_its_image(tmp_path: Path) -> None:
    root = tmp_path / "MME"
    (root / "color").mkdir(parents=True)
    (root / "color" / "x.txt").write_text("Is it red?\tNo\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"x\.txt:1: field 'image': no image x"):
        load_benchmark(EvalConfig(format="mme", questions=str(root)))


# --- MMBench ----------------------------------------------------------------------------------------


def mmbench_tsv(tmp_path: Path, rows: list[dict[str, str]], columns: tuple[str, ...] | None = None) -> Path:
    columns = columns or ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image")
    lines = ["\t".join(columns)] + ["\t".join(row.get(c, "") for c in columns) for row in rows]
    path = tmp_path / "mmbench.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MMBENCH_ROWS = [
    {"index": "10", "question": "Which shape?", "hint": "nan", "A": "circle", "B": "square", "C": "star", "D": "cross",
     "answer": "B", "category": "shape", "image": png_base64(0)},
    {"index": "11", "question": "Which colour?", "hint": "Look closely.", "A": "red", "B": "blue", "C": "nan", "D": "nan",
     "answer": "A", "category": "color", "image": "10"},  # the full MMBench refers to an earlier row's image by index
]


def test_mmbench_circular_rotations_prompts_and_references(tmp_path: Path) -> None:
    items = mmbench.load(mmbench_tsv(tmp_path, MMBENCH_ROWS), None)
    assert [item.id for item in items] == ["10@0", "10@1", "10@2", "10@3", "11@0", "11@1"]
    assert items[1].question == "Which shape?\nA. square\nB. star\nC. cross\nD. circle"
    assert [item.reference for item in items] == ["B", "A", "D", "C", "A", "B"]
    assert items[4].question == "Look closely.\nWhich colour?\nA. red\nB. blue"
    assert items[4].image == items[0].image  # resolved through the index reference
    assert len(mmbench.load(mmbench_tsv(tmp_path, MMBENCH_ROWS), None, circular=False)) == 2


def test_mmbench_circular_accuracy_needs_every_rotation(tmp_path: Path) -> None:
    cfg = EvalConfig(format="mmbench", questions=str(mmbench_tsv(tmp_path, MMBENCH_ROWS)))
    items = load_benchmark(cfg)
    answers = [f"{item.reference}." for item in items]  # all right ...
    answers[5] = "A"  # ... but the second rotation of question 11
    result = score_benchmark(cfg, items, answers)
    overall = result.metrics["overall"]
    assert overall["circular_accuracy"] == pytest.approx(0.5) and overall["vanilla_accuracy"] == pytest.approx(1.0)
    assert overall["chance_circular"] == pytest.approx(((1 / 4) ** 4 + (1 / 2) ** 2) / 2)
    assert result.report.skills == {"color": 0.0, "shape": 1.0} and result.report.counts == {"color": 1, "shape": 1}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("B", "B"), ("B. square", "B"), ("(C)", "C"), ("The answer is C", "C"), ("It is a star.", "C"),
     ("A or B", None), ("B. not A", "B"), ("E", None), ("circle or square", None), ("a square", "B")],
)
def test_mmbench_answer_matching(answer: str, expected: str | None) -> None:
    assert mmbench.parse_answer(answer, ["circle", "square", "star", "cross"]) == expected


@pytest.mark.parametrize(
    ("change", "line", "field", "problem"),
    [
        ({"image": "not*base64!"}, 2, "image", "not valid base64"),
        ({"image": base64.b64encode(b"plain text, not an image").decode()}, 2, "image", "not an image"),
        ({"answer": "E"}, 2, "answer", "not one of the options"),
        ({"B": ""}, 2, "B", "options A and B"),
        ({"C": "nan", "D": "cross"}, 2, "D", "C is empty"),
        ({"image": "99"}, 2, "image", "index 99"),
    ],
    ids=["base64", "not_image", "answer", "one_option", "gap", "dangling_reference"],
)
def test_bad_mmbench_rows_name_file_line_and_field(tmp_path: Path, change: dict, line: int, field: str, problem: str) -> None:
    rows = [{**MMBENCH_ROWS[0], **change}]
    with pytest.raises(FormatError, match=rf"mmbench\.tsv:{line}: field '{field}':.*{problem}"):
        mmbench.load(mmbench_tsv(tmp_path, rows), None)


def test_mmbench_missing_column_is_named(tmp_path: Path) -> None:
    path = mmbench_tsv(tmp_path, MMBENCH_ROWS, columns=("index", "question", "A", "B", "C", "D", "category", "image"))
    with pytest.raises(FormatError, match=r"mmbench\.tsv:1: field 'answer': column missing"):
        mmbench.load(path, None)


# --- VQA --------------------------------------------------------------------------------------------


def test_vqa_exact_and_normalized_match(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "sub" / "a.png")
    records = [
        {"question_id": "q1", "image": "sub/a.png", "question": "How many dogs?", "answers": [{"answer": "2"}, {"answer": "two"}]},
        {"question_id": "q2", "image": "sub/a.png", "question": "What is it?", "answer": "red bus", "category": "object"},
        {"question_id": "q3", "image": "sub/a.png", "text": "Price?", "answer": "3.5"},
        {"question_id": "q4", "image": "sub/a.png", "question": "Colour?", "answer": "green"},
    ]
    cfg = EvalConfig(format="vqa", questions=str(write_jsonl(tmp_path / "vqa.jsonl", records)), images=str(images))
    items = load_benchmark(cfg)
    answers = ["Two.", "The red bus", "3.5", "blue"]
    result = score_benchmark(cfg, items, answers)
    assert result.metrics["overall"]["exact_match"] == pytest.approx(1 / 4)  # only "3.5"
    assert result.metrics["overall"]["normalized_match"] == pytest.approx(3 / 4)
    assert result.report.skills == {"all": pytest.approx(2 / 3), "object": 1.0}
    assert vqa.normalize("The Two  red, buses!") == "2 red buses" and vqa.normalize("3.5") == "3.5"


def test_vqa_bad_answers_field(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    questions = write_jsonl(tmp_path / "vqa.jsonl", [{"question_id": 1, "image": "a.png", "question": "q", "answers": [""]}])
    with pytest.raises(FormatError, match=r"vqa\.jsonl:1: field 'answers':"):
        vqa.load(questions, tmp_path)


# --- config and the command line ---------------------------------------------------------------------


def test_eval_config_resolves_the_prompt_suffix_per_format() -> None:
    assert EvalConfig().prompt_suffix == ""
    assert EvalConfig(format="mmbench").prompt_suffix.endswith("letter from the given choices directly.")
    assert EvalConfig(format="pope", prompt_suffix="").prompt_suffix == ""
    with pytest.raises(ValueError, match=r"eval\.format='gqa'"):
        EvalConfig(format="gqa")
    with pytest.raises(ValueError, match=r"eval\.questions=PATH"):
        load_benchmark(EvalConfig(format="pope"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    tokenizer_dir = train_tokenizer(["is there a red circle", "yes", "no"] * 5, root / "tokenizer", vocab_size=300)
    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = ModelConfig(vision=VisionConfig(image_size=32, patch_size=16, dim=32, layers=1, heads=2), dim=32, layers=1,
                      heads=2, kv_heads=1)
    torch.manual_seed(0)
    model = VLM(cfg, len(tokenizer), tokenizer.convert_tokens_to_ids("<image>"))
    state = {"stage": "instruct", "step": 0, "model_config": asdict(cfg), "tokenizer_dir": str(tokenizer_dir)}
    save_checkpoint(root / "checkpoints", "final", model, None, state)
    return root


def test_command_line_scores_a_checkpoint(checkpoint: Path, tmp_path: Path, capsys) -> None:
    questions, images = pope_file(tmp_path)
    out = tmp_path / "scores.json"
    code = main(["--checkpoint", str(checkpoint), "--format", "pope", "--questions", str(questions),
                 "--images", str(images), "--out", str(out), "--max-new-tokens", "3", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    payload = json.loads(out.read_text())
    assert set(payload["metrics"]["overall"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert len(payload["predictions"]) == 6 and payload["report"]["skills"].keys() == {"adversarial", "random"}


def test_command_line_reports_a_bad_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png")
    questions = write_jsonl(tmp_path / "pope.jsonl", [{"question_id": 1, "image": "a.png", "label": "yes"}])
    code = main(["--checkpoint", str(checkpoint), "--format", "pope", "--questions", str(questions), "--images", str(images)])
    assert code == 2
    assert "pope.jsonl:1: field 'text': missing" in capsys.readouterr().err
