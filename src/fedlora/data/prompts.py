"""Prompt formatting and tokenization with labels on response tokens only."""

from __future__ import annotations

from dataclasses import dataclass

from .examples import Example

IGNORE = -100
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n{context_block}### Response:\n"
_KEEP_TAIL = 16  # tokens of the prompt's end (the response header) kept when the middle is cut


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class PromptFormatter:
    """`plain`: an instruction/context/response template; `chat`: the tokenizer's chat template."""

    def __init__(self, tokenizer, template: str = "auto", max_length: int = 256):
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            from ..errors import ConfigError

            raise ConfigError("data.template: 'chat' but this tokenizer has no chat template; use 'plain'")
        self.tok = tokenizer
        self.template = template
        self.max_length = max_length
        if tokenizer.eos_token_id is None:
            from ..errors import ModelError

            raise ModelError("the tokenizer has no EOS token; cannot mark the end of responses")

    def prompt_text(self, ex: Example) -> str:
        if self.template == "chat":
            user = ex.instruction if not ex.context else f"{ex.instruction}\n\n{ex.context}"
            return self.tok.apply_chat_template(
                [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
            )
        ctx = f"### Context:\n{ex.context}\n\n" if ex.context else ""
        return PLAIN_TEMPLATE.format(instruction=ex.instruction, context_block=ctx)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _fit_prompt(self, ids: list[int], budget: int) -> list[int]:
        """Cut the middle of an over-long prompt (usually the context), keeping its head and its tail."""
        if len(ids) <= budget:
            return ids
        tail = min(_KEEP_TAIL, budget // 2)
        return ids[: budget - tail] + ids[len(ids) - tail:]

    def encode_prompt(self, ex: Example, max_new_tokens: int = 0) -> list[int]:
        return self._fit_prompt(self._ids(self.prompt_text(ex)), self.max_length - max_new_tokens)

    def encode(self, ex: Example) -> Encoded:
        prompt = self._ids(self.prompt_text(ex))
        response = self._ids(ex.response) + [self.tok.eos_token_id]
        room_for_response = self.max_length - min(len(prompt), self.max_length // 2)
        response = response[:room_for_response]
        prompt = self._fit_prompt(prompt, self.max_length - len(response))
        return Encoded(prompt + response, [IGNORE] * len(prompt) + response)
