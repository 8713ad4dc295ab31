"""The HTTP teacher against a real local server: the project's own tiny model behind /v1/chat/completions."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from curation.sources.world import WorldConfig, check_answer
from vlm_core.eval.evaluate import answer_questions
from vlm_core.hf.checkpoint import load_trained
from vlm_core.loop.config import HttpTeacherConfig, TeacherConfig
from vlm_core.loop.generators import HttpTeacher, WorldTeacher, chat_request
from vlm_core.loop.server import make_server
from vlm_core.types import Sample, Turn


@pytest.fixture(scope="module")
def server(trained_run: Path) -> Iterator[str]:
    httpd = make_server(trained_run, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions"
    finally:
        httpd.shutdown()
        httpd.server_close()


def local_answers(run: Path, samples, max_tokens: int) -> list[str]:
    trained = load_trained(run)
    return answer_questions(trained.model, samples, trained.encoder, trained.processor, max_tokens, 1)


def test_http_teacher_returns_the_served_models_answers(server: str, trained_run: Path, smoke_cfg,
                                                        tmp_path: Path) -> None:
    world: WorldConfig = smoke_cfg.job.data.world
    plan = {"count": 3, "color": 2}
    cfg = HttpTeacherConfig(url=server, verify=False, max_tokens=8)
    out = HttpTeacher(cfg, WorldTeacher(world, TeacherConfig(), tmp_path, frozenset())).generate(
        plan, seed=7, split="r1h", source="r1_http")
    # The same questions with the oracle's answers, asked of the model directly (no HTTP).
    reference = WorldTeacher(world, TeacherConfig(), tmp_path / "ref", frozenset()).generate(plan, 7, "r1h", "ref")
    expected = local_answers(trained_run, reference.samples, 8)
    kept = [(s, a) for s, a in zip(reference.samples, expected) if a]
    assert [s.id for s, _ in kept] == [s.id for s in out.samples]
    assert [a for _, a in kept] == [s.turns[-1].text for s in out.samples]
    assert sum(out.rejected.values()) + len(out.samples) == 5  # only empty answers are dropped without verify
    verified = HttpTeacher(HttpTeacherConfig(url=server, verify=True, max_tokens=8),
                           WorldTeacher(world, TeacherConfig(), tmp_path / "v", frozenset())).generate(plan, 7, "r1h", "v")
    assert len(verified.samples) + sum(verified.rejected.values()) == 5
    for sample in verified.samples:  # with verify, only answers the oracle accepts are kept
        scene = verified.scenes[str(sample.image_paths[0])]
        assert check_answer(sample.skill, scene, sample.meta["questions"][0], sample.turns[-1].text) == 1.0


def test_server_speaks_the_openai_format(server: str, trained_run: Path, tmp_path: Path, smoke_cfg) -> None:
    world = smoke_cfg.job.data.world
    record = WorldTeacher(world, TeacherConfig(), tmp_path, frozenset()).generate({"count": 1}, 1, "q", "q").samples[0]
    question = "How many shapes are there?"
    # The server puts each image part where it stands among the text parts: chat_request sends the image
    # first, as the world writes its prompts by default; asked the other way round, the part order follows.
    for position, prompt in (("first", f"<image>\n{question}"), ("last", f"{question}\n<image>")):
        text = chat_request(server, "any-name", question, record.image_paths[0], 4, 30, image_position=position)
        asked = Sample(id="q", source="q", image_paths=record.image_paths,
                       turns=(Turn("user", prompt), Turn("assistant", "")))
        assert text == local_answers(trained_run, [asked], 4)[0]
    models = json.loads(urllib.request.urlopen(server.replace("/chat/completions", "/models"), timeout=30).read())
    assert models["object"] == "list" and models["data"]
    bad = urllib.request.Request(server, data=json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}).encode(), method="POST",
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(bad, timeout=30)
    assert error.value.code == 400 and "data URL" in json.loads(error.value.read())["error"]["message"]
