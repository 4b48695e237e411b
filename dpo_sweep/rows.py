"""Rows of any supported format as texts: (prompt, chosen, rejected).

- standard: {prompt, chosen, rejected} strings, optional `system` (prepended to the prompt, or
  rendered as a system message when the tokenizer has a chat template);
- conversational: `chosen`/`rejected` (and optional `prompt`) are lists of {role, content}
  messages, rendered with the tokenizer's chat template;
- implicit prompt: no `prompt`; the shared prefix of chosen and rejected is the prompt.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Sequence, Tuple

from transformers import PreTrainedTokenizerBase

from dpo_sweep.pairs import BadRow, DataError

# Half of a surrogate pair on its own: a JSON escape can spell one (\ud800), but it is no
# character and no tokenizer can encode it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_text(text: str, where: str) -> None:
    found = _LONE_SURROGATE.search(text)
    if found:
        raise DataError(f"{where}: a lone surrogate {found.group()!r} at character {found.start()} "
                        "(half of a UTF-16 pair); expected valid Unicode text")


def _check_messages(value: List[Any], where: str) -> None:
    if not value:
        raise DataError(f"{where}: an empty message list; expected at least one {{'role': str, 'content': str}}")
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {k}: expected {{'role': str, 'content': str}}, got {m!r:.80}")
        _check_text(m["role"], f"{where}: message {k}: role")
        _check_text(m["content"], f"{where}: message {k}: content")


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def normalise(row: Dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str) -> Tuple[str, str, str, bool]:
    """Return (prompt, chosen, rejected, templated) texts of one row of any supported format.

    `templated` tells whether the text came from a chat template (which adds its own BOS).
    """
    _check_fields(row, where)
    prompt, chosen, rejected, system = row.get("prompt"), row["chosen"], row["rejected"], row.get("system")
    if _is_messages(chosen):
        return _normalise_messages(prompt, chosen, rejected, system, tokenizer, where)
    return _normalise_text(prompt, chosen, rejected, system, tokenizer, where)


def _check_fields(row: Any, where: str) -> None:
    """The row is an object whose fields have the types of one of the formats, and its text is
    valid Unicode."""
    if isinstance(row, BadRow):
        raise DataError(f"{where}: {row.problem}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields prompt, chosen, rejected; got {row!r:.80}")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (expected fields prompt, chosen, rejected)")
        if not isinstance(row[key], (str, list)):
            raise DataError(f"{where}: field '{key}': expected a string or a list of messages, "
                            f"got {type(row[key]).__name__}")
    prompt, system = row.get("prompt"), row.get("system")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field 'prompt': expected a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system': expected a string, got {type(system).__name__}")
    if _is_messages(row["chosen"]) != _is_messages(row["rejected"]):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")
    for key in ("prompt", "chosen", "rejected", "system"):
        if isinstance(row.get(key), str):
            _check_text(row[key], f"{where}: field '{key}'")


def _normalise_messages(prompt, chosen, rejected, system, tokenizer, where: str) -> Tuple[str, str, str, bool]:
    """A conversational row: messages checked, the prompt made explicit, then rendered."""
    _check_messages(chosen, f"{where}: field 'chosen'")
    _check_messages(rejected, f"{where}: field 'rejected'")
    if prompt is None:  # implicit prompt: the shared leading messages
        n = _common_prefix_len(chosen, rejected)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    else:
        _check_messages(prompt, f"{where}: field 'prompt'")
    if system:
        prompt = [{"role": "system", "content": system}] + list(prompt)
    if not prompt:
        raise DataError(f"{where}: field 'prompt': missing, and 'chosen' and 'rejected' share no leading "
                        "message to take as the prompt; expected a prompt")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise DataError(f"{where}: field '{key}': the response is empty")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: conversational row, but the tokenizer has no chat template")
    return _render_messages(prompt, chosen, rejected, tokenizer, where)


def _render_messages(prompt, chosen, rejected, tokenizer, where: str) -> Tuple[str, str, str, bool]:
    """Prompt and responses through the chat template; each response is what prompt + response
    renders after the rendered prompt."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    texts = []
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(list(prompt) + list(msgs), tokenize=False)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: field '{key}': the chat template does not render the prompt "
                            "as a prefix of prompt + response")
        texts.append(full[len(prompt_text) :])
    return prompt_text, texts[0], texts[1], True


def _normalise_text(prompt, chosen: str, rejected: str, system, tokenizer, where: str) -> Tuple[str, str, str, bool]:
    """A standard or implicit-prompt row of strings."""
    if prompt is None:  # implicit prompt: the shared leading text, ending before a space
        n = _common_prefix_len(chosen, rejected)
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(prompt, list):
        raise DataError(f"{where}: field 'prompt' is a message list but the responses are strings")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: field '{key}': the response is empty")
    if chosen == rejected:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    if system:
        if getattr(tokenizer, "chat_template", None):
            prompt_text = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
            )
            return prompt_text, chosen, rejected, True
        prompt = f"{system}\n\n{prompt}"
    return prompt, chosen, rejected, False
