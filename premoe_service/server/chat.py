"""Chat templates for `/v1/chat/completions`: a template file (`--chat-template`), the tokenizer's own, or a plain
default for tokenizers that have none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InvalidArgument

# For a tokenizer without a template: one `role: content` line per message, then `assistant:` to answer. It
# writes no special tokens, so the tokenizer's own (BOS) are added as for a completion.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplate:
    """Renders messages into a prompt with the chosen template.

    Args:
        tokenizer: The model's tokenizer (renders with its Jinja environment and special tokens).
        path: A Jinja template file that replaces the tokenizer's own; None: the tokenizer's, else the default.
    """

    def __init__(self, tokenizer: Any, path: Path | None = None) -> None:
        self.tokenizer = tokenizer
        if path is not None:
            check_template(path)
            self.source, self.origin = Path(path).read_text(encoding="utf-8"), str(path)
        elif getattr(tokenizer, "chat_template", None):
            self.source, self.origin = str(tokenizer.chat_template), "tokenizer"
        else:
            self.source, self.origin = DEFAULT_TEMPLATE, "default"

    @property
    def adds_special_tokens(self) -> bool:
        """Whether a rendered prompt still needs the tokenizer's special tokens: only the default's does (a
        model's own template writes its BOS itself, as vLLM assumes)."""
        return self.origin == "default"

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """The prompt for `messages`, and whether the tokenizer's special tokens go on top of it."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.source, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # the template's own checks (raise_exception) and Jinja errors
            raise InvalidArgument(f"the chat template refused these messages: {exc}", field="messages") from None
        return str(text), self.adds_special_tokens


def check_template(path: Path) -> None:
    """Refuse a template file that is not readable Jinja (at start-up, naming the flag)."""
    import jinja2

    try:
        jinja2.Environment().parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, jinja2.TemplateSyntaxError) as exc:
        raise InvalidArgument(f"cannot read the chat template {path}: {exc}", field="chat_template") from None
