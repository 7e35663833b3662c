"""A response's JSON schema as a grammar (llguidance), torch-free: the router refuses a
schema that does not compile before any work starts, and the workers build their token
masks from the same grammar (workers/grammar.py)."""

from __future__ import annotations

import json

# Whitespace between JSON tokens: any JSON whitespace, as the library allows by default,
# but at most 20 characters per gap, so a small model cannot spend its whole budget on
# newlines (pretty-printed output still fits; a schema's own "x-guidance" overrides it).
WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"


def grammar_for(json_schema: str) -> str:
    """The llguidance grammar of a JSON schema (JSON text)."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(json.loads(json_schema), defaults={"whitespace_pattern": WHITESPACE})


def schema_error(json_schema: str) -> str | None:
    """Why a schema cannot be compiled, in the library's words; None if it can. Needs no
    tokenizer (the router checks requests with it)."""
    import llguidance

    try:
        err = llguidance.LLMatcher.validate_grammar(grammar_for(json_schema))
    except Exception as e:  # noqa: BLE001 - any failure to build the grammar is the schema's
        return str(e)
    return err or None
