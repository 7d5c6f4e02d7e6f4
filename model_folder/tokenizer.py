"""The tokenizer of a model folder: tokenizer.json, its special tokens, and the chat template.

A thin layer over the `tokenizers` library that gives what transformers' AutoTokenizer gives for the
same folder (encode, decode, apply_chat_template), without importing transformers at serving time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer

from model_folder.chunked_encoding import ChunkedEncoder
from model_folder.deepseek_chat_format import deepseek_chat_template
from model_folder.errors import ModelFolderError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer folders keep the template here; it wins, as in transformers
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and render chats the way transformers does for the same folder."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        generation_eos_token_ids: Sequence[int] = (),
        generation_bos_token_id: int | None = None,
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})  # name ("bos_token", ...) -> token text
        self.chat_template = chat_template
        self.bos_token_id = self._id_of("bos_token", default=generation_bos_token_id)
        self.eos_token_ids = _unique((*generation_eos_token_ids, *_optional(self._id_of("eos_token"))))
        self.all_special_ids = tuple(
            sorted(token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special)
        )
        self._compiled_template: jinja2.Template | None = None
        self._encoder = ChunkedEncoder(backend)  # long texts in parallel chunks, where that is exact

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        tokenizer_path = folder / TOKENIZER_FILE
        if not tokenizer_path.is_file():
            raise ModelFolderError(f"{tokenizer_path}: {TOKENIZER_FILE} is missing from the model folder")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_path))
        except Exception as error:  # the Rust library raises plain Exception on a malformed file
            raise ModelFolderError(f"{tokenizer_path}: cannot be loaded ({error})") from error
        config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        generation = _read_json(folder / GENERATION_CONFIG_FILE)
        return cls(
            backend,
            special_tokens=_special_tokens(config, _read_json(folder / "special_tokens_map.json")),
            chat_template=_chat_template(folder, config) or deepseek_chat_template(backend.token_to_id),
            generation_eos_token_ids=_as_ids(generation.get("eos_token_id")),
            generation_bos_token_id=generation.get("bos_token_id"),
        )

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest vocabulary entry, added tokens included. No token stands for
        more bytes of text than its entry spells: byte-level BPE spells each byte with one or two
        bytes, sentencepiece a space with "▁" (3 bytes) and a fallback byte with "<0xNN>" (6)."""
        return max(len(piece.encode("utf-8")) for piece in self.backend.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; `add_special_tokens` applies the post-processor (e.g. a leading BOS). The same
        as `backend.encode(...)`, on several cores for a long text (model_folder/chunked_encoding.py)."""
        return self._encoder.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # transformers 5 skips `clean_up_tokenization_spaces` for BPE models, so none is applied here.
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
        """The prompt text for a chat. It often starts with the BOS text: encode it without special tokens.
        `tools`: OpenAI's tool definitions, for templates that render them."""
        if self.chat_template is None:
            raise ModelFolderError(f"{TOKENIZER_CONFIG_FILE}: the model folder has no chat_template")
        if self._compiled_template is None:
            self._compiled_template = _template_environment().from_string(self.chat_template)
        return self._compiled_template.render(
            messages=[dict(message) for message in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )

    def _id_of(self, name: str, default: int | None = None) -> int | None:
        token = self.special_tokens.get(name)
        token_id = self.backend.token_to_id(token) if token is not None else None
        return token_id if token_id is not None else default


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object, or {} when the (optional) file is absent."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ModelFolderError(f"{path}: must hold a JSON object")
    return content


def _token_text(value: Any) -> str | None:
    # Older tokenizer configs store AddedToken dicts ({"content": "<s>", "__type": "AddedToken", ...}).
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict[str, Any], special_tokens_map: dict[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name)) or _token_text(special_tokens_map.get(name))
        if text is not None:
            tokens[name] = text
    return tokens


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, int) else tuple(value)


def _optional(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _template_environment() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in (templates are untrusted code)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return environment
