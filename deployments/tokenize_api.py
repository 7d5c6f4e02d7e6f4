"""POST /tokenize and /detokenize, with vLLM's request and response shapes.

A client about to send a contract set or a monorepo as one prompt asks first how many tokens it
is and whether it fits: /tokenize answers with the count and the model's context length, for a
text (`prompt`) or a chat (`messages`, through the model's chat template, as /v1/chat/completions
renders it). A prompt longer than the context is counted, not refused: the count is the answer.
The request body limit (serve.max_request_body_bytes) bounds the work; long texts are tokenized
off the event loop. /detokenize turns token ids back into text.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import Field

from deployments.openai_api import ChatMessage, RequestBody, Text, Tool
from deployments.prompts import PromptBuilder, off_loop_if_long
from protocol.sampling_params import InvalidParameterError

class TokenizeRequest(RequestBody):
    """vLLM's two bodies in one: `prompt` (a text) or `messages` (a chat), exactly one of them."""

    model: Text | None = None
    prompt: Text | None = None
    add_special_tokens: bool = Field(True, description="A text's post-processor (e.g. a leading BOS).")
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_generation_prompt: bool = Field(True, description="A chat ends with the assistant's turn, as a chat request.")
    tools: list[Tool] | None = None
    return_token_strs: bool = Field(False, description="Also each token's text.")


class DetokenizeRequest(RequestBody):
    model: Text | None = None
    tokens: list[int]


class TokenizeService:
    def __init__(self, prompts: PromptBuilder, check_model):
        """`check_model(name)`: raises the API's 404 for a model this server does not serve."""
        self.prompts = prompts
        self.check_model = check_model

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidParameterError("prompt", "give either `prompt` (a text) or `messages` (a chat)")
        if body.prompt is not None:
            token_ids = await off_loop_if_long(self.prompts.text_tokens, len(body.prompt), body.prompt,
                                                body.add_special_tokens)
        else:
            messages = [message.template_message() for message in body.messages]
            tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
            num_chars = sum(len(message["content"]) for message in messages)
            token_ids = await off_loop_if_long(self.prompts.chat_tokens, num_chars, messages, tools,
                                                body.add_generation_prompt)
        strings = [self.prompts.token_text(token) for token in token_ids] if body.return_token_strs else None
        return {"count": len(token_ids), "max_model_len": self.prompts.max_model_len, "tokens": token_ids,
                "token_strs": strings}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, str]:
        self.check_model(body.model)
        vocab_size = self.prompts.vocab_size
        if any(token < 0 or token >= vocab_size for token in body.tokens):
            raise InvalidParameterError("tokens", f"token ids must be in [0, {vocab_size})")
        return {"prompt": await off_loop_if_long(self.prompts.prompt_text, len(body.tokens), body.tokens, False)}


def install_tokenize_routes(app: FastAPI, service: TokenizeService, dependencies: list, responses: dict) -> None:
    """The two routes on `app`, behind the same `dependencies` (API keys) as /v1/*."""

    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await service.tokenize(body)

    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        return await service.detokenize(body)

    app.add_api_route("/tokenize", tokenize, methods=["POST"], dependencies=dependencies, responses=responses,
                      summary="Count and list a prompt's tokens (text, or chat messages through the template)")
    app.add_api_route("/detokenize", detokenize, methods=["POST"], dependencies=dependencies, responses=responses,
                      summary="Token ids back to text")
