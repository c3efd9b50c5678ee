"""``chat_template``: the chat template written with the merged tokenizer (mergekit 0.1.5's rules).

The value is one of

* a built-in name: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral`` (templates of our own
  that render every conversation exactly as mergekit 0.1.5's files of those names do, blank
  lines and all; ``tests/test_tokenizer_merge.py`` checks that against mergekit's files when the
  mergekit venv is there);
* ``auto``: the template most of the input models' tokenizers carry (the first seen on a tie;
  none written when no input has one);
* a literal Jinja template: any other text containing ``{`` and at least 20 characters long.

Anything else (a short word that is not a built-in name, text without ``{``) is an error. The
template is written as ``chat_template.jinja`` (what transformers 5 and mergekit 0.1.5 write), and
any ``chat_template`` in ``tokenizer_config.json`` or ``chat_template.json`` is dropped so only
the new one is read.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

AUTO = "auto"
JINJA_FILE = "chat_template.jinja"

# Our templates, one per mergekit built-in name; whitespace is explicit ({%- -%} everywhere), so
# the output does not depend on the renderer's trim settings.
BUILTIN = {
    "chatml": (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "llama3": (
        "{%- for m in messages -%}"
        "{%- if loop.first -%}{{ bos_token }}{%- endif -%}"
        "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' ~ (m['content'] | trim) ~ '<|eot_id|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
    ),
    "mistral": (
        "{%- set first = messages[0] if messages else none -%}"
        "{%- set has_system = first is not none and first['role'] == 'system' -%}"
        "{%- set turns = messages[1:] if has_system else messages -%}"
        "{{ bos_token }}"
        "{%- for m in turns -%}"
        "{%- set expect_user = loop.index0 % 2 == 0 -%}"
        "{%- if (m['role'] == 'user') != expect_user -%}"
        "{{ raise_exception('After the optional system message, conversation roles must alternate "
        "user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- set text = (first['content'] ~ '\\n\\n' ~ m['content']) if (loop.first and has_system) else m['content'] -%}"
        "{{ ' [INST] ' ~ text ~ ' [/INST]' }}"
        "{%- elif m['role'] == 'assistant' -%}"
        "{{ ' ' ~ m['content'] ~ eos_token }}"
        "{%- else -%}"
        "{{ raise_exception('Only user and assistant roles are supported, with the exception of an "
        "initial optional system message!') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    "alpaca": (
        "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{ (systems | last)['content'] | trim if systems else '' }}{{ '\\n\\n' }}"
        "{%- set heads = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n', "
        "'user_context': '### Input:\\n'} -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] in heads -%}"
        "{{ heads[m['role']] ~ (m['content'] | trim) }}"
        "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{ '### Response:\\n' }}{%- endif -%}"
    ),
    "exaone": (
        "{%- for m in messages -%}"
        "{%- if loop.first and m['role'] != 'system' -%}{{ '        [|system|][|endofturn|]\\n\\n' }}{%- endif -%}"
        "{{ '    [|' ~ m['role'] ~ '|]' ~ m['content'] ~ '\\n        ' }}"
        "{{ ('\\n' if m['role'] == 'user' else '[|endofturn|]\\n') ~ '\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '    [|assistant|]\\n' }}{%- endif -%}"
    ),
}


class ChatTemplateError(ValueError):
    """A ``chat_template`` value that is neither a built-in name, ``auto``, nor a template."""


def check_chat_template(value, key: str = "chat_template") -> str | None:
    """The value as written, checked by mergekit's rules (None stays None); raises
    ChatTemplateError naming the built-in names."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ChatTemplateError(f"{key}: expected a template name or Jinja text, got {value!r}")
    if value == AUTO or value in BUILTIN:
        return value
    if len(value) < 20 or "{" not in value:
        raise ChatTemplateError(
            f"{key}: {value[:60]!r} is neither a built-in template ({', '.join(sorted(BUILTIN))}), "
            f"'auto', nor a Jinja template (text with '{{', at least 20 characters)"
        )
    return value


def template_of_files(files: dict) -> str | None:
    """The chat template an input's tokenizer carries, from its files ({name: bytes}):
    ``chat_template.jinja``, else ``chat_template.json``, else ``tokenizer_config.json``'s
    ``chat_template`` (a list of named templates: the one named 'default')."""
    if JINJA_FILE in files:
        return files[JINJA_FILE].decode("utf-8", "replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if name not in files:
            continue
        try:
            obj = json.loads(files[name])
        except ValueError:
            continue
        t = obj.get("chat_template") if isinstance(obj, dict) else None
        if isinstance(t, list):
            t = next(
                (e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None
            )
        if isinstance(t, str):
            return t
    return None


def resolve_chat_template(value: str | None, input_files: list) -> str | None:
    """The template text to write (None: none). ``input_files``: per input (base first, then the
    models in order) its tokenizer files {name: bytes}, read only for ``auto``."""
    if value is None:
        return None
    if value in BUILTIN:
        return BUILTIN[value]
    if value == AUTO:
        found = [t.strip() for t in (template_of_files(f) for f in input_files) if t]
        if not found:
            return None
        return Counter(found).most_common(1)[0][0]
    return value


def apply_to_files(folder: Path, names: list, template: str) -> list:
    """Write ``template`` as ``folder/chat_template.jinja`` and drop other copies of a chat
    template there (``chat_template.json``; the key in ``tokenizer_config.json``). Returns the
    file names now in ``folder`` of those in ``names`` plus the template file."""
    folder = Path(folder)
    out = [n for n in names if n != "chat_template.json"]
    if "chat_template.json" in names:
        os.unlink(folder / "chat_template.json")
    tc = folder / "tokenizer_config.json"
    if "tokenizer_config.json" in names:
        try:
            obj = json.loads(tc.read_text(encoding="utf-8"))
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "chat_template" in obj:
            del obj["chat_template"]
            tc.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / JINJA_FILE).write_text(template, encoding="utf-8")
    if JINJA_FILE not in out:
        out.append(JINJA_FILE)
    return out


__all__ = [
    "BUILTIN",
    "AUTO",
    "ChatTemplateError",
    "check_chat_template",
    "resolve_chat_template",
    "template_of_files",
    "apply_to_files",
]
