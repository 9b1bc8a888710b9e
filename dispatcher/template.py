"""A campaign's text template: `{column}` placeholders filled from each row.

    t = Template("Hi {name}, your table is at {time}")
    t.fields                   # ("name", "time")
    t.render({"name": "Ada", "time": "19:30"})

`{{` and `}}` stand for literal braces. A placeholder is a name of letters, digits, `_`, `-`,
`.` or spaces (a CSV header's own words); nothing else is evaluated (unlike str.format, no
attribute or index access). A row missing a placeholder's value, or giving an empty one,
cannot be rendered: `render` raises MissingField naming the variable.
"""

from __future__ import annotations

import re
from typing import Mapping

from .errors import MissingField, ValidationError

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_NAME = re.compile(r"^[\w .\-]+$")


class Template:
    def __init__(self, text: str) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValidationError("template", "must be a non-empty text, e.g. 'Hi {name}'")
        parts: list[str] = []  # even indexes: literal text; odd indexes: a variable's name
        literal: list[str] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            literal.append(text[pos:m.start()])
            token = m.group(0)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif m.group(1) is None:
                raise ValidationError("template", f"a lone {token!r} at character {m.start() + 1}: write {token * 2} "
                                                  "for a literal brace")
            else:
                name = m.group(1).strip()
                if not _NAME.match(name):
                    raise ValidationError("template", f"{{{m.group(1)}}} is not a column name")
                parts += ["".join(literal), name]
                literal = []
            pos = m.end()
        literal.append(text[pos:])
        parts.append("".join(literal))
        self.text = text
        self._parts = parts
        self.fields = tuple(dict.fromkeys(parts[1::2]))

    def render(self, values: Mapping[str, object]) -> str:
        out = list(self._parts)
        for i in range(1, len(out), 2):
            name = out[i]
            value = values.get(name)
            if value is None:
                raise MissingField(name, "variable missing from the row")
            value = str(value)
            if not value.strip():
                raise MissingField(name, "variable is empty")
            out[i] = value
        return "".join(out)
