"""What a constrained request's output must match, as it travels gateway -> scheduler ->
executor inside its SamplingParams.

Only the grammar's *source* travels (a JSON schema, a regex, a choice list, an EBNF
grammar): a few hundred bytes, where a compiled grammar with its token-mask cache is
70-200 KB for this vocabulary. The executor compiles each distinct source once (bounded
cache, `services/executor/structured_output.py`); the gateway has already checked that
it compiles, so an invalid one is a 400 and never reaches a step.
"""

from __future__ import annotations

import json
from typing import Literal

import msgspec

GrammarKind = Literal["json_schema", "regex", "choice", "grammar"]


class GrammarSpec(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """`kind` says how to read `source`:
    - json_schema: a JSON schema as JSON text (`{"type": "object"}` for json_object);
    - regex: a regular expression the whole output must match;
    - choice: a JSON list of strings, one of which the output must be exactly;
    - grammar: an EBNF grammar (xgrammar's dialect of GBNF) with a `root` rule."""

    kind: GrammarKind
    source: str

    def to_ebnf_choice(self) -> str:
        """The EBNF of a choice list: `root ::= "a" | "b"` (JSON string escapes are also
        EBNF's). Only for kind == "choice"."""
        choices = json.loads(self.source)
        return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
