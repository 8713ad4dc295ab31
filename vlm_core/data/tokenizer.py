"""Tokenization: train and load the tokenizer, and turn a conversation into ids, loss mask and image groups.

Chat format of the tokenizer trained here (``CHAT_TEMPLATE``), for two rounds::

    <s><|user|>\\n{user 1}\\n<|assistant|>\\n{answer 1}</s><|user|>\\n{user 2}\\n<|assistant|>\\n{answer 2}</s>

- Every assistant answer ends with ``</s>`` (eos) and nothing follows it inside the turn, so the tokens that
  carry loss are exactly the answer and its eos: the model learns to stop, and never has to predict a
  separator that generation (which stops at eos) would never produce.
- The generation prompt is ``<|assistant|>\\n``; it is also what precedes every answer, so a prompt built
  for generation is token-for-token the prefix the model was trained on.
- No newline is needed after ``</s>``: it and ``<|user|>`` are single special tokens, so the turn boundary
  is already unambiguous.
- The answer is wrapped in ``{% generation %}`` so Hugging Face's ``return_assistant_tokens_mask`` gives
  the same mask as ``ChatEncoder`` for this template.

``ChatEncoder`` does not depend on that format: it derives the loss mask by rendering any tokenizer's
chat template incrementally, so an external tokenizer folder (``load_tokenizer``) works the same way.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from vlm_core.types import Turn

if TYPE_CHECKING:
    # transformers is imported inside the functions that need it: the LLaVA loader imports the token
    # constants from here, and curation should not pay transformers' import time to validate records.
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
# In id order: a tokenizer trained here has <pad> = 0, <s> = 1, </s> = 2, <image> = 3, <|user|> = 4, <|assistant|> = 5.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
# Tokens that delimit a conversation; record text that contains one would forge a turn boundary.
CONTROL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)
GENERATION_PROMPT = ASSISTANT_TOKEN + "\n"

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user|>\\n' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\\n' -}}"
    "{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception(\"unsupported role '\" + message['role'] + \"': this chat template knows 'user' and 'assistant'\") -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

_BYTE_ALPHABET_SIZE = 256  # byte-level BPE starts from one symbol per byte value


def train_tokenizer(texts: Iterable[str], out_dir: Path | str, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a Hugging Face tokenizer folder.

    Byte-level BPE rather than whitespace + BPE: every string, including characters never seen in
    training, round-trips exactly (no ``<unk>``), and spaces and newlines survive decoding, which the
    chat format relies on. Digits are split off one by one before BPE, so ``12`` is always ``1``, ``2``
    whatever the training text; a count answer is spelled the same way in every context.

    The folder (``tokenizer.json``, ``tokenizer_config.json`` with ``chat_template``) is written to a
    temporary sibling, loaded back with ``AutoTokenizer`` as a check, and only then moved to ``out_dir``
    with ``os.replace``, so a crash never leaves a half-written tokenizer behind.

    Returns ``out_dir``. The vocabulary may come out smaller than ``vocab_size`` when the texts have few
    distinct merges; size the embedding with ``len(load_tokenizer(out_dir))``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_vocab = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {min_vocab} "
            f"({_BYTE_ALPHABET_SIZE} byte symbols + {len(SPECIAL_TOKENS)} special tokens); use e.g. 1024"
        )
    out_dir = Path(out_dir)
    counted = _CountingTexts(texts)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # add_prefix_space=False keeps decode(encode(text)) == text exactly.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(counted, trainer=trainer)  # the trainer adds SPECIAL_TOKENS as ids 0..5
    if counted.count == 0:
        raise ValueError("train_tokenizer got no texts; pass the questions and answers of the training records")
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if backend.token_to_id(token) != expected_id:
            raise RuntimeError(f"special token {token!r} got id {backend.token_to_id(token)}, expected {expected_id}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=PAD_TOKEN,
            extra_special_tokens=[IMAGE_TOKEN, USER_TOKEN, ASSISTANT_TOKEN],
            clean_up_tokenization_spaces=False,  # would turn "a , b" into "a, b" and break round trips
        )
        fast.save_pretrained(str(staging))
        _write_config(staging)
        _check_saved(staging)
        os.chmod(staging, 0o755)  # mkdtemp creates 0o700; the folder is meant to be shared
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "trained a byte-level BPE tokenizer (%d tokens) on %d texts into %s", backend.get_vocab_size(), counted.count, out_dir
    )
    return out_dir


class _CountingTexts:
    """Iterates over the training texts, checking their type and counting them (the trainer runs in Rust).

    Special-token strings are cut out of the texts first: the BPE trainer does not know them while it
    trains and would otherwise learn merges such as ``<imag`` from texts with ``<image>`` placeholders,
    wasting vocabulary on pieces that never occur once the special token is matched whole.
    """

    _SPECIAL = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if not isinstance(text, str):
                raise TypeError(f"train_tokenizer: text #{self.count} is {type(text).__name__}, expected str")
            self.count += 1
            yield from (piece for piece in self._SPECIAL.split(text) if piece)


def _write_config(folder: Path) -> None:
    """Put the chat template into tokenizer_config.json (transformers 5 writes it to chat_template.jinja).

    One file that every transformers version reads, and ``tokenizer_class`` set to the name that both 4.x
    and 5.x resolve (5.x writes ``TokenizersBackend``, which 4.x does not know).
    """
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config["clean_up_tokenization_spaces"] = False
    config["add_bos_token"] = False  # the chat template writes <s>; tokenizer(text) must not add another
    config["add_eos_token"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def _check_saved(folder: Path) -> None:
    """Load the staged folder the way users will, and check the special tokens and the template survived."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        ids = loaded(token, add_special_tokens=False)["input_ids"]
        if ids != [expected_id]:
            raise RuntimeError(f"saved tokenizer in {folder} encodes {token!r} as {ids}, expected [{expected_id}]")
    if loaded.chat_template != CHAT_TEMPLATE:
        raise RuntimeError(f"saved tokenizer in {folder} lost its chat template")


def _replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` folder is replaced.

    ``os.replace`` cannot overwrite a non-empty directory, so an old folder is first renamed aside. Between
    the two renames ``target`` briefly does not exist, but it never holds a mix of old and new files.
    """
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"tokenizer output {target} exists and is not a folder; pick another out_dir")
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)  # only the unique name is wanted; os.replace needs the destination absent or empty
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path: Path | str) -> PreTrainedTokenizerFast:
    """Load a local Hugging Face tokenizer folder (ours or an external one) without touching the network.

    - A folder without ``<image>`` gets it added as a special token. This grows the vocabulary by one, so
      the model's embedding must have ``len(tokenizer)`` rows (a warning says so).
    - A folder without a chat template raises ValueError: the loss mask is derived from the template.
    - A folder without a pad token pads with eos; padded slots carry no loss, so any id would do.
    """
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"tokenizer folder {folder} does not exist; train one with vlm_core.data.tokenizer.train_tokenizer "
            "or point the config at a local Hugging Face tokenizer folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"tokenizer folder {folder} cannot be loaded by AutoTokenizer: {exc}") from exc
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"tokenizer folder {folder} loads as {type(tokenizer).__name__}, not a fast (tokenizers-backed) "
            "tokenizer; save it with a tokenizer.json (AutoTokenizer.from_pretrained(...).save_pretrained(...))"
        )
    if not tokenizer.chat_template:
        raise ValueError(
            f"tokenizer folder {folder} has no chat template; add a Jinja 'chat_template' to its "
            "tokenizer_config.json (or a chat_template.jinja file) that renders 'user' and 'assistant' "
            "messages and honours add_generation_prompt"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer folder {folder} has no eos_token; set 'eos_token' in its tokenizer_config.json "
            "to the token that ends an assistant turn (generation stops there)"
        )
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
        logger.warning(
            "tokenizer folder %s had no %s token; added it as id %d. The model's token embedding and "
            "output layer must be sized to len(tokenizer) = %d, not the folder's vocab size.",
            folder, IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), len(tokenizer),
        )
    image_ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]
    if image_ids != [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]:
        raise ValueError(
            f"tokenizer folder {folder} splits {IMAGE_TOKEN} into {image_ids}; it must be one special "
            "(added) token, so declare it in added_tokens with special=true"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("tokenizer folder %s has no pad token; padding with eos %r", folder, tokenizer.eos_token)
    return tokenizer


class EncodedChat(NamedTuple):
    """A conversation as ids; unpacks as ``input_ids, loss_mask, bidir_group``."""

    input_ids: torch.Tensor  # [T] int64
    loss_mask: torch.Tensor  # [T] bool, True on assistant answer tokens and the eos that ends each answer
    bidir_group: torch.Tensor  # [T] int32, 0 for text, k on the P tokens of the k-th image (1-based)


class ChatEncoder:
    """Turns ``Turn`` sequences into ids with the tokenizer's own chat template.

    The assistant mask is derived generically: the template is rendered for the conversation up to each
    turn (and, before an assistant turn, with ``add_generation_prompt=True``). Each rendering must extend
    the previous one; the text it adds is one segment, tokenized on its own. Segments added by an assistant
    turn carry loss, up to and including their last eos token (what follows eos inside the segment, such
    as ChatML's newline after ``<|im_end|>``, is never generated, so it is not trained). Because every
    segment is tokenized separately, no token straddles a turn boundary, and the prompt built for
    generation is exactly the prefix seen in training.

    Each ``<image>`` in a user turn becomes ``num_image_tokens`` (P) copies of the image token id; the
    copies of the k-th image in the conversation get ``bidir_group`` k.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, num_image_tokens: int) -> None:
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens={num_image_tokens}; each image needs at least one token")
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id is None or image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"tokenizer {name} has no {IMAGE_TOKEN} token; load it with load_tokenizer(), which adds it"
            )
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name} has no eos_token; an assistant turn needs a token that ends it")
        if not tokenizer.chat_template:
            raise ValueError(f"tokenizer {name} has no chat template; load it with load_tokenizer() for the fix")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id: int = image_token_id
        self.eos_token_id: int = tokenizer.eos_token_id
        # Padding slots carry no loss, so eos serves when a tokenizer has no pad token.
        pad_token_id = tokenizer.pad_token_id
        self.pad_token_id: int = pad_token_id if pad_token_id is not None else tokenizer.eos_token_id
        self._name = name
        control = sorted(
            {token.content for token in tokenizer.added_tokens_decoder.values() if token.special} - {IMAGE_TOKEN},
            key=len,
            reverse=True,  # longest first, so the reported token is the whole one
        )
        self._control_pattern = re.compile("|".join(map(re.escape, control))) if control else None

    def encode(self, turns: Sequence[Turn]) -> EncodedChat:
        """Ids, loss mask and image groups of a training conversation (user first, assistant last).

        Returns ``EncodedChat(input_ids [T] int64, loss_mask [T] bool, bidir_group [T] int32)``.
        """
        self._check_turns(turns, last_role="assistant")
        ids, mask = self._tokenize(self._segments(turns, add_generation_prompt=False))
        return self._expand(ids, mask)

    def encode_prompt(self, turns: Sequence[Turn]) -> torch.Tensor:
        """Ids of a generation prompt: the conversation (ending with a user turn) plus the generation prompt.

        Returns ``input_ids [T]`` int64; the image groups follow from the ids with ``bidir_groups``.
        """
        self._check_turns(turns, last_role="user")
        ids, mask = self._tokenize(self._segments(turns, add_generation_prompt=True))
        return self._expand(ids, mask).input_ids

    def num_tokens(self, turns: Sequence[Turn]) -> int:
        """``len(encode(turns).input_ids)`` without building tensors (for length tables)."""
        self._check_turns(turns, last_role="assistant")
        ids, _ = self._tokenize(self._segments(turns, add_generation_prompt=False))
        num_images = sum(1 for token in ids if token == self.image_token_id)
        return len(ids) + num_images * (self.num_image_tokens - 1)

    def bidir_groups(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``bidir_group [T]`` int32 of ids produced by this encoder: runs of P image tokens get 1, 2, ..."""
        is_image = input_ids == self.image_token_id  # [T]
        count = int(is_image.sum())
        if count % self.num_image_tokens:
            raise ValueError(
                f"{count} image tokens is not a multiple of num_image_tokens={self.num_image_tokens}; "
                "these ids were not produced by this encoder"
            )
        order = torch.cumsum(is_image.to(torch.int64), 0) - 1  # [T], index among image tokens
        return torch.where(is_image, order // self.num_image_tokens + 1, 0).to(torch.int32)

    def _check_turns(self, turns: Sequence[Turn], last_role: str) -> None:
        if not turns:
            raise ValueError("empty conversation: need at least one user turn")
        for index, turn in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if turn.role != expected:
                raise ValueError(
                    f"turn {index} has role {turn.role!r}, expected {expected!r}: "
                    "turns must alternate user/assistant, starting with user"
                )
            if self._control_pattern is not None and (found := self._control_pattern.search(turn.text)):
                raise ValueError(
                    f"turn {index} ({turn.role}) contains the control token {found.group()!r}, which the tokenizer "
                    "would read as a chat delimiter; remove it from the data "
                    "(the LLaVA loader quarantines such records)"
                )
        if turns[-1].role != last_role:
            raise ValueError(f"the last turn has role {turns[-1].role!r}, expected {last_role!r}")

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as exc:
            roles = [message["role"] for message in messages]
            raise ValueError(f"chat template of tokenizer {self._name} failed on roles {roles}: {exc}") from exc

    def _segments(self, turns: Sequence[Turn], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """Split the rendered conversation into (text, is_assistant_answer) segments, in order."""
        messages = [{"role": turn.role, "content": turn.text} for turn in turns]
        segments: list[tuple[str, bool]] = []
        rendered = ""

        def extend(longer: str, turns_rendered: int, is_answer: bool) -> str:
            if not longer.startswith(rendered):
                raise ValueError(
                    f"chat template of tokenizer {self._name} is not prefix-stable: the rendering of the first "
                    f"{turns_rendered} turn(s) {longer!r} does not start with the rendering before it {rendered!r}. "
                    "The assistant loss mask cannot be derived from it; use a template that renders a conversation "
                    "prefix as a prefix of the full conversation "
                    "(no per-conversation suffixes, no rewriting of earlier turns)"
                )
            if len(longer) > len(rendered):
                segments.append((longer[len(rendered):], is_answer))
            return longer

        for index, turn in enumerate(turns):
            if turn.role == "assistant":
                # Everything the template writes before the answer (the generation prompt) carries no loss.
                rendered = extend(self._render(messages[:index], add_generation_prompt=True), index, False)
            is_answer = turn.role == "assistant"
            rendered = extend(self._render(messages[: index + 1], add_generation_prompt=False), index + 1, is_answer)
        if add_generation_prompt:
            rendered = extend(self._render(messages, add_generation_prompt=True), len(turns), False)
        return segments

    def _tokenize(self, segments: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        """Tokenize each segment on its own; loss on answer segments up to and including their last eos."""
        if not segments:
            return [], []
        encoded = self.tokenizer([text for text, _ in segments], add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        mask: list[bool] = []
        for (text, is_answer), segment_ids in zip(segments, encoded):
            segment_mask = [is_answer] * len(segment_ids)
            if is_answer:
                if self.image_token_id in segment_ids:
                    raise ValueError(f"assistant turn {text!r} contains {IMAGE_TOKEN}; images belong in user turns")
                eos_positions = [i for i, token in enumerate(segment_ids) if token == self.eos_token_id]
                if eos_positions:
                    for i in range(eos_positions[-1] + 1, len(segment_ids)):
                        segment_mask[i] = False
            ids.extend(segment_ids)
            mask.extend(segment_mask)
        return ids, mask

    def _expand(self, ids: list[int], mask: list[bool]) -> EncodedChat:
        """Repeat every image token P times and number the images 1, 2, ... in order."""
        input_ids = torch.tensor(ids, dtype=torch.int64)  # [T_text]
        loss_mask = torch.tensor(mask, dtype=torch.bool)  # [T_text]
        is_image = input_ids == self.image_token_id  # [T_text]
        groups = torch.cumsum(is_image.to(torch.int32), 0, dtype=torch.int32) * is_image  # [T_text]
        repeats = torch.where(is_image, self.num_image_tokens, 1)  # [T_text]
        return EncodedChat(
            input_ids=input_ids.repeat_interleave(repeats),  # [T]
            loss_mask=loss_mask.repeat_interleave(repeats),  # [T]
            bidir_group=groups.to(torch.int32).repeat_interleave(repeats),  # [T]
        )
