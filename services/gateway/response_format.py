"""A request's output constraint, from whichever field the client used, as one GrammarSpec.

Accepted on both endpoints (vLLM does the same):
- OpenAI's `response_format`: `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; `"text"` is
  no constraint. The output always matches the schema, `strict` or not.
- vLLM's `structured_outputs: {json | regex | choice | grammar | json_object}`, and its
  older top-level `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.
At most one constraint per request. Every grammar is compiled once by the gateway's
checker (`grammar_validator.py`) before it is submitted: an invalid one is a 400 whose
`param` names the field it came from.
"""

from __future__ import annotations

import json
from typing import Any

from pagedserve.services.gateway.errors import invalid_request
from pagedserve.services.gateway.grammar_validator import GrammarValidator
from pagedserve.services.gateway.openai_protocol import SamplingFields
from pagedserve.shared.structured_output import GrammarSpec

JSON_OBJECT_SCHEMA = '{"type": "object"}'
# xgrammar's schema converter recurses on the C++ stack: a schema 2,000 deep crashes the
# process that compiles it (the gateway's checker, then the executor). No real schema
# comes near this.
MAX_SCHEMA_DEPTH = 128


def check_schema_depth(schema: Any, param: str) -> None:
    """A 400 naming `param` when objects and arrays nest deeper than MAX_SCHEMA_DEPTH
    (measured without recursion)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise invalid_request(f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep", param)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _schema_source(value: dict[str, Any] | str, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise invalid_request(f"{param} is not valid JSON: {error}", param) from None
        except RecursionError:
            raise invalid_request(f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} deep", param) from None
        if not isinstance(value, dict):
            raise invalid_request(f"{param} must be a JSON schema object", param)
    check_schema_depth(value, param)
    return json.dumps(value)


def _choice_source(choices: list[str], param: str) -> str:
    if not choices:
        raise invalid_request(f"{param} must hold at least one choice", param)
    if any(not choice for choice in choices):
        raise invalid_request(f"{param} holds an empty string; every choice must be non-empty", param)
    return json.dumps(choices, ensure_ascii=False)


def _named_constraints(holder: Any, attribute_prefix: str, param_prefix: str) -> list[tuple[GrammarSpec, str]]:
    """The json / regex / choice / grammar constraints `holder` carries as the attributes
    `{attribute_prefix}json` and so on: vLLM's `structured_outputs` object and its older
    top-level `guided_*` fields are the same four. Errors name `{param_prefix}json`..."""
    found: list[tuple[GrammarSpec, str]] = []
    for name in ("json", "regex", "choice", "grammar"):
        value = getattr(holder, attribute_prefix + name)
        if value is None:
            continue
        param = param_prefix + name
        if name == "json":
            spec = GrammarSpec("json_schema", _schema_source(value, param))
        elif name == "choice":
            spec = GrammarSpec("choice", _choice_source(value, param))
        else:
            spec = GrammarSpec(name, value)
        found.append((spec, param))
    return found


def requested_constraints(fields: SamplingFields) -> list[tuple[GrammarSpec, str]]:
    """Every constraint the request names, each with the field it came from."""
    found: list[tuple[GrammarSpec, str]] = []
    response_format = fields.response_format
    if response_format is not None:
        if response_format.type == "json_object":
            found.append((GrammarSpec("json_schema", JSON_OBJECT_SCHEMA), "response_format"))
        elif response_format.type == "json_schema":
            json_schema = response_format.json_schema
            if json_schema is None:
                raise invalid_request("response_format.json_schema is required when type is 'json_schema'", "response_format.json_schema")
            schema = json_schema.schema if json_schema.schema is not None else {"type": "object"}
            param = "response_format.json_schema.schema"
            found.append((GrammarSpec("json_schema", _schema_source(schema, param)), param))
    structured = fields.structured_outputs
    if structured is not None:
        found += _named_constraints(structured, "", "structured_outputs.")
        if structured.json_object:
            found.append((GrammarSpec("json_schema", JSON_OBJECT_SCHEMA), "structured_outputs.json_object"))
    found += _named_constraints(fields, "guided_", "guided_")
    return found


async def checked_grammar(validator: GrammarValidator, spec: GrammarSpec, param: str) -> GrammarSpec:
    """`spec` once the checker has compiled it; a 400 naming `param` if it does not."""
    error = await validator.error_of(spec)
    if error is not None:
        what = {"json_schema": "JSON schema", "regex": "regex", "choice": "choice list", "grammar": "grammar"}[spec.kind]
        raise invalid_request(f"{param}: invalid {what}: {error}", param, code="invalid_grammar")
    return spec


async def structured_output(
    validator: GrammarValidator, fields: SamplingFields, extra: tuple[GrammarSpec, str] | None = None
) -> GrammarSpec | None:
    """The request's one checked constraint (None: free text). `extra` is one the
    endpoint adds itself (a forced tool call), which excludes the others."""
    found = requested_constraints(fields)
    if extra is not None:
        found.append(extra)
    if len(found) > 1:
        names = ", ".join(param for _, param in found)
        raise invalid_request(f"only one output constraint may be given per request, got {len(found)}: {names}", found[1][1])
    if not found:
        return None
    spec, param = found[0]
    if fields.beam_width is not None and fields.beam_width > 1:
        raise invalid_request(f"{param} cannot be combined with beam search (beam_width > 1)", param)
    if fields.ignore_eos:
        raise invalid_request(f"{param} cannot be combined with ignore_eos: a completed grammar allows only EOS", "ignore_eos")
    return await checked_grammar(validator, spec, param)
