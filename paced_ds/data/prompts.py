"""Prompt formatting: the text a model sees before it writes its response.

A tokenizer with a chat template gets its own template (the format its model was tuned
on); otherwise a plain ``str.format`` template (``data.prompt_template``) wraps the
problem's prompt. ``privileged_prompt`` builds the teacher's view for self-distillation,
where the teacher is shown the reference answer.
"""

from __future__ import annotations

import string

from paced_ds.errors import UserError

DEFAULT_TEMPLATE = "{prompt}"
DEFAULT_PRIVILEGED_TEMPLATE = "The answer is {answer}.\n{prompt}"


def format_prompt(tokenizer, prompt: str, *, system: str | None = None, template: str | None = None,
                  use_chat_template: bool = True) -> str:
    """The text to tokenise for ``prompt``, ending where the response begins.

    With ``use_chat_template`` and a tokenizer that has a ``chat_template``: an optional
    system message and the prompt as the user's message, rendered with the generation
    prompt appended. Otherwise ``template`` (default ``"{prompt}"``), which must contain
    ``{prompt}`` and may contain ``{system}``; a ``system`` given to a template without
    ``{system}`` goes on its own line before the rest. ``template`` is checked even when
    the chat template is used, so a bad ``data.prompt_template`` is never silently kept.
    """
    template = DEFAULT_TEMPLATE if template is None else template
    names = _check_template(template, required=("prompt",), allowed=("prompt", "system"),
                            key="data.prompt_template")
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = template.format(prompt=prompt, system=system or "")
    if system and "system" not in names:
        text = f"{system}\n{text}"
    return text


def privileged_prompt(prompt: str, answer: str, template: str = DEFAULT_PRIVILEGED_TEMPLATE) -> str:
    """The prompt with the reference answer shown, for a teacher that distils into itself.

    ``template`` must contain ``{prompt}`` and ``{answer}``. Apply ``format_prompt`` to
    the result as to any prompt.
    """
    _check_template(template, required=("prompt", "answer"), allowed=("prompt", "answer"),
                    key="teacher.privileged_template")
    return template.format(prompt=prompt, answer=answer)


def _check_template(template: str, *, required: tuple[str, ...], allowed: tuple[str, ...],
                    key: str) -> set[str]:
    """The placeholder names in ``template``, after checking them against the allowed ones."""
    if not isinstance(template, str):
        raise UserError(f"{key}: must be a string, got {type(template).__name__}")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:  # a lone "{" or "}"
        raise UserError(f"{key}: {e} in {template!r}; write literal braces as {{{{ and }}}}") from None
    placeholders = ", ".join("{" + name + "}" for name in allowed)
    for name in sorted(names):
        if name not in allowed:
            raise UserError(f"{key}: unknown placeholder {{{name}}} in {template!r}; "
                            f"it may use {placeholders}")
    for name in required:
        if name not in names:
            raise UserError(f"{key}: must contain {{{name}}}, got {template!r}")
    return names
