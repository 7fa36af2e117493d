"""The chat template a complete-mode run wraps its prompts in (``data.chat_template``): checked
before any row is read, by rendering one conversation, so that a template that cannot parse or
refuses a system message fails naming the file and line, not as a jinja2 traceback from inside the
tokenizing map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lgen.errors import ConfigError


def template(chat_template: bool | str, *, system_prompt: str | None, complete: bool, tokenizer: Any) -> str | None:
    """The template text of a file named by ``chat_template`` (None: the tokenizer's own, or no
    template), after refusing settings that do not go together and a template that fails on a
    sample conversation."""
    if system_prompt is not None and not chat_template:
        raise ConfigError("data.system_prompt goes into the chat template: set data.chat_template: true "
                          "(or a template file) as well")
    if not chat_template:
        return None
    if not complete:
        raise ConfigError("data.chat_template wraps whole prompts (complete mode); strided windows of a long "
                          "text are not chat messages: unset it, or set data.mode: complete")
    text = None
    if isinstance(chat_template, str):
        try:
            text = Path(chat_template).read_text()
        except OSError as err:
            raise ConfigError(f"data.chat_template={chat_template!r} is not a readable template file "
                              f"({err.strerror}); give a Jinja file, or true for the tokenizer's own") from None
    elif not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template: true, but the tokenizer has no chat template; give a Jinja "
                          "template file instead (data.chat_template: path/to/template.jinja)")
    _render_sample(tokenizer, text, chat_template=chat_template, system_prompt=system_prompt)
    return text


def _render_sample(tokenizer: Any, text: str | None, *, chat_template: bool | str, system_prompt: str | None) -> None:
    """Render one conversation (with the system message when there is one): a template that
    refuses it (``raise_exception``, as Gemma's refuses a system role) fails here."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    def render(system: bool) -> None:
        messages = [{"role": "system", "content": system_prompt}] if system else []
        tokenizer.apply_chat_template([*messages, {"role": "user", "content": "Hello"}], tokenize=False,
                                      add_generation_prompt=True, chat_template=text)

    try:
        render(system_prompt is not None)
    except TemplateError as err:
        where = "data.chat_template: true (the tokenizer's template)" if text is None \
            else f"data.chat_template={chat_template!r}"
        message = " ".join(str(err).split())
        if isinstance(err, TemplateSyntaxError):
            line = f", line {err.lineno}" if err.lineno else ""
            raise ConfigError(f"{where}{line}: the template does not parse ({message}); fix the template") from None
        fix = "fix the template, or give another one"
        if system_prompt is not None:
            try:
                render(False)
                fix = "the template takes no system message: unset data.system_prompt, or give another template"
            except TemplateError:
                pass
        raise ConfigError(f"{where} fails on a sample conversation ({type(err).__name__}: {message}); {fix}") \
            from None
