"""OpenAI-compatible request and response models (pydantic v2).

Requests are validated at the edge, and every problem becomes a 400 through
``router.errors.from_validation_error`` with the field path as ``param``:

* Unknown fields are ignored, as vLLM does (the official API refuses them); they are
  kept in ``ignored_fields`` so the server can log them.
* Known fields must have the right JSON type: no bools for ints (``max_tokens: true``),
  no strings for numbers. ``null`` means "the default" for every optional field.
* Features this server does not have (tools, suffix, best_of != n, response_format
  types other than text / json_object / json_schema) are refused with "not supported"
  instead of silently ignored, unless the value asks for nothing (``tools: []``).
* Ranges: presence / frequency penalty in [-2, 2], repetition_penalty in [0.01, 2],
  logit_bias values in [-100, 100] with integer token-id keys (the vocabulary bound and
  the schema's compilation are checked by the API, which knows the model).

A request gives the engine's ``SamplingParams`` per choice (``to_sampling_params``);
stop *strings* are not engine parameters: the router applies them to detokenized text
(``stop_strings``, see ``router.detokenizer``).

Responses serialize exactly as OpenAI's JSON (``model_dump()`` / ``model_dump_json()``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from workers.sampling_params import BIAS_RANGE, MAX_LOGPROBS, PENALTY_RANGE, REPETITION_RANGE, SamplingParams

MAX_N = 16
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 128  # prompts x n
MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_CACHE_SALT_CHARS = 1024  # cache_salt length bound
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM reports impossible tokens the same way

Number = Annotated[float, Strict()]  # a JSON number: ints and floats, never bools or strings
PositiveInt = Annotated[StrictInt, Field(ge=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
LogprobCount = Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)]


def _unsupported(message: str) -> PydanticCustomError:
    # The message goes through the context so braces in it are not read as a template.
    return PydanticCustomError("unsupported_parameter", "{detail}", {"detail": message})


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _invalid(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", "{detail}", {"detail": message})


def _wrong_type(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_type", "{detail}", {"detail": message})


def _reject(field: str, value: Any, error: PydanticCustomError) -> ValidationError:
    """A ValidationError located at ``field``, for checks that span fields (pydantic
    keeps the location when a validator raises one)."""
    return ValidationError.from_exception_data("request", [InitErrorDetails(type=error, loc=(field,), input=value)])


# ================================================================= requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions (field order matters: the
    cross-field checks read fields declared before them)."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: PositiveInt | None = None
    temperature: Annotated[Number, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[Number, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1)] = 0  # vLLM extension; -1 and 0 disable it
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: list[str] = Field(default_factory=list)  # normalized: a str becomes [str]
    stop_token_ids: list[TokenId] = Field(default_factory=list)  # vLLM extension
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted and ignored
    min_tokens: Annotated[StrictInt, Field(ge=0)] = 0  # vLLM extension
    ignore_eos: StrictBool = False  # vLLM extension
    skip_special_tokens: StrictBool = True  # vLLM extension
    presence_penalty: Annotated[Number, Field(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])] = 0.0
    frequency_penalty: Annotated[Number, Field(ge=PENALTY_RANGE[0], le=PENALTY_RANGE[1])] = 0.0
    repetition_penalty: Annotated[Number, Field(ge=REPETITION_RANGE[0], le=REPETITION_RANGE[1])] = 1.0  # vLLM extension
    logit_bias: dict[str, Any] | None = None  # {"token id": bias}; normalized to {int: float}
    # {"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None
    # kvrelay extension: the KV payload preset for this request (None: the deployment's);
    # the names are the built-in presets and the deployment's own, checked by the API.
    kv_compression: StrictStr | None = None
    # vLLM's prefix-cache isolation: requests hit only cached prefixes computed under
    # the same salt (none: the namespace of the request's API key, or the shared one).
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise _wrong_type("stop must be a string or an array of strings")
        if len(v) > MAX_STOP_STRINGS:
            raise _invalid(f"at most {MAX_STOP_STRINGS} stop strings are supported, got {len(v)}")
        for i, s in enumerate(v):
            if not isinstance(s, str):
                raise _wrong_type(f"stop[{i}] must be a string")
            if not s:
                raise _invalid(f"stop[{i}] is empty; stop strings must be non-empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_map(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise _invalid(f"logit_bias has {len(v)} entries; at most {MAX_LOGIT_BIAS} are supported")
        out = {}
        lo, hi = BIAS_RANGE
        for key, bias in v.items():
            try:
                token = int(key)
            except ValueError:
                raise _invalid(f"logit_bias keys must be token ids (integers as strings), got {key!r}") from None
            if token < 0:
                raise _invalid(f"logit_bias key {key!r} is negative; token ids are >= 0")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise _wrong_type(f"logit_bias[{key!r}] must be a number")
            if not lo <= bias <= hi:
                raise _invalid(f"logit_bias[{key!r}] = {bias} is outside [{lo:g}, {hi:g}]")
            out[str(token)] = float(bias)
        return out

    @field_validator("response_format")
    @classmethod
    def _known_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return None
        kind = v.get("type")
        if kind in ("text", "json_object"):
            return v
        if kind != "json_schema":
            raise _unsupported(f"response_format type {kind!r} is not supported; use 'text', 'json_object' or 'json_schema'")
        spec = v.get("json_schema")
        if not isinstance(spec, dict):
            raise _wrong_type("response_format.json_schema must be an object like {\"name\": ..., \"schema\": {...}}")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise _wrong_type("response_format.json_schema.schema must be a JSON schema object")
        return v

    @model_validator(mode="after")
    def _cross_field_checks(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            problem = "The 'stream_options' parameter is only allowed when 'stream' is enabled"
            raise _reject("stream_options", None, _invalid(problem))
        max_tokens = self.requested_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            problem = f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})"
            raise _reject("min_tokens", self.min_tokens, _invalid(problem))
        return self

    # ---------------------------------------------------------- what the router uses

    @property
    def requested_max_tokens(self) -> int | None:
        """The completion length the client asked for; None: as much as the context allows."""
        return self.max_tokens

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Stream a final chunk with ``usage`` and no choices."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def engine_logprobs(self) -> int | None:
        """SamplingParams.logprobs: None for none, k >= 0 for the sampled token and top k."""
        raise NotImplementedError

    @property
    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    @property
    def json_schema(self) -> str | None:
        """The schema every choice must follow (JSON text), from response_format; None for text."""
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt["type"] == "json_object":
            return json.dumps({"type": "object"})
        return json.dumps(fmt["json_schema"]["schema"])

    @property
    def bias_token_ids(self) -> list[int]:
        return [int(t) for t in self.logit_bias or {}]

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """SamplingParams.prompt_logprobs (echo with logprobs on completions)."""
        return None

    def to_sampling_params(self, default_max_tokens: int | None = None, choice_index: int = 0,
                           cache_namespace: str | None = None) -> SamplingParams:
        """The engine's parameters for choice ``choice_index`` of ``n``.

        ``default_max_tokens`` is used when the request sets no length (chat without
        max_tokens): the router passes the room left in the context. min_tokens is
        clipped to that room. With a seed and n > 1, choice i samples with seed + i so
        the choices differ yet the request stays reproducible (vLLM does the same).
        ``cache_namespace``: the prefix-cache namespace the API resolved for the request
        (cluster.block_hash.cache_namespace, from cache_salt and the API key).
        """
        max_tokens = self.requested_max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens
        if max_tokens is None:
            raise ValueError("the request sets no max_tokens; pass default_max_tokens (the room left in the context)")
        seed = self.seed
        if seed is not None and choice_index:
            seed = seed + choice_index
            if seed > SEED_MAX:
                seed -= 2**64
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=self.top_k,
            seed=seed,
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.engine_logprobs,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=tuple((int(t), b) for t, b in (self.logit_bias or {}).items()),
            json_schema=self.json_schema,
            prompt_logprobs=self.engine_prompt_logprobs,
            cache_namespace=cache_namespace,
        )


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. ``prompt``: a string, a list of token ids, or a list of
    those (up to MAX_PROMPTS); normalized to a list of prompts. Choice ``k * n + i`` is
    choice i of prompt k. ``echo`` returns each prompt before its completion; with
    ``logprobs`` also the prompt tokens' logprobs (the first one null)."""

    prompt: list[str | list[int]]
    max_tokens: PositiveInt = 16
    logprobs: LogprobCount | None = None
    echo: StrictBool = False
    best_of: PositiveInt | None = None
    suffix: StrictStr | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: Any) -> Any:
        shape = "prompt must be a string, an array of token ids, or an array of strings or token-id arrays"
        if isinstance(v, str) or (isinstance(v, list) and v and all(_is_token(t) for t in v)):
            v = [v]
        if not isinstance(v, list):
            raise _wrong_type(shape)
        if not v:
            raise _invalid("prompt must not be empty")
        if len(v) > MAX_PROMPTS:
            raise _invalid(f"at most {MAX_PROMPTS} prompts per request are supported, got {len(v)}")
        for i, p in enumerate(v):
            where = "prompt" if len(v) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                if not p:
                    raise _invalid(f"{where} must not be empty")
            elif isinstance(p, list) and all(_is_token(t) for t in p):
                if not p:
                    raise _invalid(f"{where} must not be empty")
                if min(p) < 0:
                    raise _invalid(f"token ids in {where} must be >= 0")
            else:
                raise _wrong_type(shape)
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise _unsupported("suffix is not supported by this server")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            problem = f"best_of is not supported by this server (it must equal n={self.n} or be omitted)"
            raise _reject("best_of", self.best_of, _unsupported(problem))
        if len(self.prompt) * self.n > MAX_CHOICES:
            problem = f"{len(self.prompt)} prompts x n={self.n} choices is over the limit of {MAX_CHOICES}"
            raise _reject("n", self.n, _invalid(problem))
        return self

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def engine_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ChatMessage(BaseModel):
    """One message, normalized: role is system | user | assistant ("developer" is
    read as "system") and content is a string (text parts joined with newlines, as
    vLLM joins them). Other fields (name, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("role", mode="before")
    @classmethod
    def _known_role(cls, v: Any) -> Any:
        if isinstance(v, str) and v in _ROLES:
            return _ROLES[v]
        if v in ("tool", "function"):
            raise _unsupported(f"role {v!r} is not supported (this server has no tool calling)")
        raise _invalid(f"unknown role {v!r}; expected 'system', 'user', 'assistant' or 'developer'")

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise _wrong_type("content must be a string or an array of text parts")
        if not v:
            raise _invalid("content must not be an empty array")
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict):
                raise _wrong_type(f"content[{i}] must be an object like {{\"type\": \"text\", \"text\": \"...\"}}")
            if part.get("type") != "text":
                raise _unsupported(f"content[{i}] has type {part.get('type')!r}; only 'text' parts are supported")
            if not isinstance(part.get("text"), str):
                raise _wrong_type(f"content[{i}].text must be a string")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions.

    Length: ``max_completion_tokens`` (current OpenAI name) or ``max_tokens``
    (deprecated name); if both are given they must be equal, else 400. Neither: the
    rest of the context (``to_sampling_params(default_max_tokens=...)``).
    """

    messages: list[ChatMessage]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool = False
    top_logprobs: LogprobCount | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _some_messages(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise _invalid("messages must be a non-empty array")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None, info: Any) -> list[Any] | None:
        if v:
            raise _unsupported(f"{info.field_name} are not supported by this server (no tool calling)")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: Any, info: Any) -> Any:
        if v not in (None, "none"):
            raise _unsupported(f"{info.field_name} is not supported by this server (no tool calling)")
        return v

    @model_validator(mode="after")
    def _lengths_and_logprobs(self) -> ChatCompletionRequest:
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            problem = f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send only max_completion_tokens"
            raise _reject("max_completion_tokens", b, _invalid(problem))
        if self.top_logprobs and not self.logprobs:
            raise _reject("top_logprobs", self.top_logprobs, _invalid("top_logprobs requires logprobs to be true"))
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


# ================================================================= responses


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


# "stop" (EOS, stop token or stop string) | "length" (max_tokens or the context) |
# "abort" (vLLM's: the server gave up on the request). None until the choice ends.
FinishReason = Literal["stop", "length", "abort"]


class _Chunk(BaseModel):
    """A streamed chunk. ``usage`` is in the JSON only when it was passed: pass
    ``usage=None`` on every chunk of a stream with include_usage (OpenAI sends null
    there) and the totals on the last, choice-less chunk; leave it out otherwise."""

    @model_serializer(mode="wrap")
    def _usage_only_when_requested(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if "usage" not in self.model_fields_set:
            data.pop("usage", None)
        return data


# ---------------------------------------------------------------- completions


class CompletionLogprobs(BaseModel):
    """With echo, the prompt's tokens come first; the first prompt token's logprob and
    top_logprobs are null (nothing predicts it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


# ---------------------------------------------------------------- chat


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    """Only the keys that are set: {"role": "assistant", "content": <first token's text>}
    first (sent once the first token exists, never before the prefill), then
    {"content": "..."}, and {} on the chunk that carries finish_reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


# ---------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "kvrelay"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ================================================================= tokenize / detokenize


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's shape): ``prompt`` (completions) or ``messages`` (chat,
    through the chat template). ``model`` is optional; if given it must be the served one."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool | None = None  # default: True for prompt, False for messages
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _reject("prompt", None, _invalid("give exactly one of 'prompt' and 'messages'"))
        if self.messages is not None and not self.messages:
            raise _reject("messages", None, _invalid("messages must be a non-empty array"))
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


# ================================================================= logprob builders


def _finite(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # also maps NaN to the floor


def completion_logprobs(
    tokens: Sequence[str],
    logprobs: Sequence[float | None],
    top: Sequence[Sequence[tuple[str, float]] | None] | None = None,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """The legacy completions shape for a run of tokens.

    tokens:      [T] the text of each token
    logprobs:    [T] its logprob (None: an echoed first prompt token; its top entry is then None too)
    top:         [T][k] (token text, logprob) best first, or None when not asked for;
                 each dict also holds the sampled token, as OpenAI's does (up to k + 1)
    text_offset: where the first token starts in the choice's text (for a stream, the
                 length of the text already sent)
    """
    if len(tokens) != len(logprobs) or (top is not None and len(top) != len(tokens)):
        raise ValueError(f"tokens, logprobs and top differ in length: {len(tokens)}, {len(logprobs)}, {len(top or [])}")
    offsets = []
    for t in tokens:
        offsets.append(text_offset)
        text_offset += len(t)
    top_dicts = None
    if top is not None:
        top_dicts = []
        for tok, lp, alts in zip(tokens, logprobs, top):
            if lp is None:
                top_dicts.append(None)
                continue
            d: dict[str, float] = {}
            for alt, alt_lp in alts:
                d.setdefault(alt, _finite(alt_lp))  # two ids with one text: keep the likelier
            d.setdefault(tok, _finite(lp))
            top_dicts.append(d)
    return CompletionLogprobs(
        tokens=list(tokens), token_logprobs=[None if x is None else _finite(x) for x in logprobs],
        top_logprobs=top_dicts, text_offset=offsets,
    )


def chat_logprobs(
    tokens: Sequence[str],
    logprobs: Sequence[float],
    top: Sequence[Sequence[tuple[str, float]]] | None = None,
) -> ChatLogprobs:
    """The chat shape: per token {token, logprob, bytes, top_logprobs: [k]} where bytes
    are the UTF-8 bytes of the token text (a token that is part of a character shows
    U+FFFD, as in vLLM)."""
    if len(tokens) != len(logprobs) or (top is not None and len(top) != len(tokens)):
        raise ValueError(f"tokens, logprobs and top differ in length: {len(tokens)}, {len(logprobs)}, {len(top or [])}")
    content = []
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        alts = top[i] if top is not None else ()
        content.append(
            ChatTokenLogprob(
                token=tok,
                logprob=_finite(lp),
                bytes=list(tok.encode("utf-8")),
                top_logprobs=[TopLogprob(token=a, logprob=_finite(x), bytes=list(a.encode("utf-8"))) for a, x in alts],
            )
        )
    return ChatLogprobs(content=content)


__all__ = [
    "MAX_LOGPROBS", "MAX_N", "MAX_STOP_STRINGS", "ChatChoice", "ChatChunkChoice", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatDelta", "ChatLogprobs", "ChatMessage",
    "ChatResponseMessage", "ChatTokenLogprob", "CompletionChoice", "CompletionChunk", "CompletionLogprobs",
    "CompletionRequest", "CompletionResponse", "DetokenizeRequest", "DetokenizeResponse", "ModelCard", "ModelList", "PromptTokensDetails", "StreamOptions",
    "TokenizeRequest", "TokenizeResponse", "TopLogprob", "Usage", "chat_completion_id", "chat_logprobs", "completion_id", "completion_logprobs", "now",
]
