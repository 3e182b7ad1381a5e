"""Text around the engine's tokens: incremental detokenization with stop strings, and chat
prompts from the checkpoint's chat template (Jinja, as Hugging Face renders it).
"""

from __future__ import annotations

from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine import Tokenizer
from server.errors import ApiError

__all__ = ["DEFAULT_CHAT_TEMPLATE", "Detokenizer", "render_chat"]

# For checkpoints without a chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Detokenizer:
    """Tokens in, text deltas out. Holds back an incomplete UTF-8 character and, when there
    are stop strings, the tail that could still become one; a stop string ends the text
    (it is not included)."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def add(self, token_id: int) -> str:
        """The new text to emit after this token (possibly empty); sets `stopped`."""
        self.token_ids.append(token_id)
        full = self.tokenizer.decode(self.token_ids)
        if self.stop:
            start = max(0, len(self.text) - self._hold)
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit(full[:min(hits)])
        safe = len(full) - self._hold
        while safe > len(self.text) and full[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(full[:max(safe, len(self.text))])

    def flush(self) -> str:
        """What is held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.token_ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.text):  # a re-segmentation changed earlier text
            return ""
        delta, self.text = text[len(self.text):], text
        return delta


@lru_cache(maxsize=8)
def _template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], *,
                add_generation_prompt: bool = True, add_bos: bool = True) -> list[int]:
    """Prompt token ids for a conversation, ending with the assistant's turn (unless
    add_generation_prompt is false: POST /tokenize may ask for the bare conversation)."""
    try:
        text = _template(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="",
            eos_token="")
    except TemplateError as e:
        raise ApiError(400, f"messages: the chat template refused them: {e}",
                       param="messages") from None
    return tokenizer.encode(text, add_bos=add_bos)
