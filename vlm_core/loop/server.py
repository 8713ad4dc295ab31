"""Serve the project's own model behind an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    python -m vlm_core.loop.server RUN_DIR_OR_CHECKPOINT --port 8000

A message's content is a string or a list of parts, ``{"type": "text", "text": ...}`` and
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``; each image part becomes one
``<image>`` placeholder at its place among the text parts (joined by newlines). Decoding is greedy
(``temperature`` is accepted and ignored); ``max_tokens`` caps the answer. Only data URLs are accepted:
the server never fetches a URL. Also answers ``GET /v1/models``. Standard library only (``http.server``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlm_core.data.tokenizer import IMAGE_TOKEN
from vlm_core.eval.evaluate import answer_prompts, prompt_sample
from vlm_core.hf.checkpoint import TrainedModel, load_trained
from vlm_core.types import Turn

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024  # a request larger than this is refused (413) before it is read
MAX_IMAGE_PIXELS = 4096 * 4096


class RequestError(ValueError):
    """A malformed request: answered with HTTP 400 and this message."""


class ChatModel:
    """The project's VLM answering one chat at a time (a lock serialises generation)."""

    def __init__(self, trained: TrainedModel, name: str = "vlm-data-metabolism") -> None:
        self.trained, self.name = trained, name
        self._lock = threading.Lock()

    def complete(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        turns, images = _turns_and_images(messages)
        if not turns or turns[-1].role != "user":
            raise RequestError("messages must end with a user message")
        trained = self.trained
        size = trained.processor.image_size
        pixels = (torch.stack([trained.processor.from_pil(image) for image in images]) if images
                  else torch.zeros(0, 3, size, size))  # [N_img, C, H, W]
        prompt = prompt_sample(turns, pixels, trained.encoder, uuid.uuid4().hex)
        with self._lock:
            return answer_prompts(trained.model, [prompt], lambda built: built, trained.tokenizer, max_tokens, 1)[0]


def _decode_image(url: str) -> Image.Image:
    if not url.startswith("data:image/") or ";base64," not in url:
        raise RequestError("image_url.url must be a base64 data URL (data:image/png;base64,...); URLs are not fetched")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise RequestError(f"image of {image.width}x{image.height} pixels is larger than {MAX_IMAGE_PIXELS}")
        return image.convert("RGB")  # decodes every pixel now, so a truncated image fails here
    except (binascii.Error, OSError) as exc:
        raise RequestError(f"image_url is not a decodable image ({exc})") from exc


def _turns_and_images(messages: list[dict[str, Any]]) -> tuple[list[Turn], list[Image.Image]]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    turns, images = [], []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "system":
            continue  # the tiny models know no system prompt
        if role not in ("user", "assistant"):
            raise RequestError(f"messages[{index}].role={role!r}; expected user, assistant or system")
        content = message.get("content")
        if isinstance(content, str):
            parts = [content]
        elif isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    parts.append(str(part.get("text", "")))
                elif kind == "image_url" and role == "user":
                    url = part.get("image_url")
                    images.append(_decode_image(url.get("url", "") if isinstance(url, dict) else str(url)))
                    parts.append(IMAGE_TOKEN)
                else:
                    raise RequestError(f"messages[{index}]: content part of type {kind!r} is not supported")
        else:
            raise RequestError(f"messages[{index}].content must be a string or a list of parts")
        turns.append(Turn(role, "\n".join(p for p in parts if p)))
    return turns, images


def make_handler(chat: ChatModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}; POST /v1/chat/completions")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self._error(413, f"request body of {length} bytes is over {MAX_BODY_BYTES}")
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or 64)
                if max_tokens < 1:
                    raise RequestError(f"max_tokens={max_tokens} must be >= 1")
                text = chat.complete(request.get("messages"), max_tokens)
            except (RequestError, json.JSONDecodeError, ValueError, TypeError, AttributeError) as exc:
                return self._error(400, str(exc))
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model") or chat.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            })

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def make_server(checkpoint: Path | str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> ThreadingHTTPServer:
    """A server (not yet serving) for the checkpoint or run directory; ``port=0`` picks a free port."""
    chat = ChatModel(load_trained(checkpoint, device=device))
    return ThreadingHTTPServer((host, port), make_handler(chat))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run directory or a checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = make_server(args.checkpoint, args.host, args.port, args.device)
    log.info("serving %s on http://%s:%d/v1/chat/completions", args.checkpoint, *server.server_address[:2])
    server.serve_forever()


if __name__ == "__main__":
    main()
