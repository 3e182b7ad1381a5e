"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the shapes vLLM's OpenAI server
serves (vllm/entrypoints/serve/tokenize/protocol.py), so that clients that tokenize remotely
(lm-eval's `tokenizer_backend=remote`) work against this server."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from server.schemas.common import Strict, TokenId
from server.schemas.openai import ChatMessage

__all__ = ["DetokenizeRequest", "DetokenizeResponse", "TokenizeRequest", "TokenizeResponse",
           "TokenizerInfo"]


class TokenizeRequest(Strict):
    """A text (`prompt`) or a conversation (`messages`, through the chat template)."""

    model: str | None = Field(None, max_length=256,
                              description="The served model or a mask profile; all share "
                                          "one tokenizer.")
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(
        True, description="Add BOS. With messages the default gives exactly the ids "
                          "/v1/chat/completions runs (the template is rendered without BOS, "
                          "which the tokenizer adds, so true here is vLLM's false there).")
    add_generation_prompt: bool = Field(True, description="messages: end with the "
                                                          "assistant's turn.")
    return_token_strs: bool = Field(False, description="Also the vocabulary's string per id.")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Strict):
    model: str | None = Field(None, max_length=256)
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """As vLLM's: tokenizer_config.json's fields. A special token's string is given only when
    encoding that string gives back its id (lm-eval takes encode(eos_token)[0] as the EOS id);
    a byte-level tokenizer's specials have no such string, so they are null."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    model_max_length: int
    vocab_size: int
    chat_template: str = Field(description="The checkpoint's, or the server's default.")
