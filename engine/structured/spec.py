"""What a request asks its output to match, in a form that is hashable and cheap to carry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class StructuredOutput:
    """`json_object`: any JSON object; `json_schema`: a JSON document valid under `schema` (compact JSON text);
    `regex` / `lark`: text matching the regular expression or Lark grammar in `schema` (custom tools' inputs)."""

    kind: Literal["json_object", "json_schema", "regex", "lark"]
    schema: str | None = None

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls("json_object")

    @classmethod
    def from_schema(cls, schema: dict[str, Any] | bool) -> "StructuredOutput":
        """Compact text in the client's key order: the grammar writes properties in the schema's order (a
        `reasoning` before an `answer` stays first), so only schemas written alike share a compiled grammar."""
        return cls("json_schema", json.dumps(schema, separators=(",", ":")))

    @classmethod
    def from_grammar(cls, syntax: Literal["regex", "lark"], definition: str) -> "StructuredOutput":
        return cls(syntax, definition)
