"""OpenAI request validation (each problem a 400 naming the field), SamplingParams
conversion, response JSON shapes and the error envelope."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from router import errors
from router.errors import APIError, from_validation_error
from router.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from workers.sampling_params import SamplingParams

MSGS = [{"role": "user", "content": "hi"}]


def completion(**kw):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hello", **kw})


def chat(**kw):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSGS, **kw})


def api_error(cls, body) -> APIError:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(body)
    return from_validation_error(info.value)


# ---------------------------------------------------------------- valid requests


def test_completion_defaults():
    r = completion()
    assert (r.prompt, r.max_tokens, r.temperature, r.top_p, r.top_k, r.n) == (["hello"], 16, 1.0, 1.0, 0, 1)
    assert (r.stream, r.include_usage, r.stop_strings, r.logprobs, r.seed) == (False, False, [], None, None)


@pytest.mark.parametrize(
    "prompt, expected",
    [("hi", ["hi"]), ([1, 2, 3], [[1, 2, 3]]), (["hi"], ["hi"]), ([[4, 5]], [[4, 5]]),
     (["a", "b"], ["a", "b"]), ([[1], [2, 3]], [[1], [2, 3]]), (["a", [7]], ["a", [7]])],
)
def test_completion_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompt == expected


def test_null_means_default_and_unknown_fields_are_ignored():
    r = completion(temperature=None, max_tokens=None, stop=None, n=None, logit_bias={}, frobnicate=3, metadata={"a": 1})
    assert (r.temperature, r.max_tokens, r.stop, r.n) == (1.0, 16, [], 1)
    assert r.ignored_fields == ["frobnicate", "metadata"]


def test_numbers_accept_ints_and_floats():
    r = completion(temperature=0, top_p=1, presence_penalty=0, frequency_penalty=0.0)
    assert r.temperature == 0.0 and r.top_p == 1.0


def test_stop_string_becomes_a_list():
    assert completion(stop="\n").stop_strings == ["\n"]
    assert completion(stop=["a", "bc"]).stop_strings == ["a", "bc"]


def test_stream_options_with_stream():
    r = completion(stream=True, stream_options={"include_usage": True})
    assert r.include_usage
    assert not completion(stream=True).include_usage


def test_best_of_equal_to_n_is_accepted():
    assert completion(best_of=2, n=2).n == 2


def test_chat_message_normalization():
    r = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
                {"role": "assistant", "content": ""},
            ],
        }
    )
    assert r.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    "fields, expected",
    [({}, None), ({"max_tokens": 7}, 7), ({"max_completion_tokens": 9}, 9), ({"max_tokens": 5, "max_completion_tokens": 5}, 5)],
)
def test_chat_max_tokens_names(fields, expected):
    assert chat(**fields).requested_max_tokens == expected


def test_chat_accepts_harmless_values_of_unsupported_features():
    r = chat(tools=[], tool_choice="none", response_format={"type": "text"}, presence_penalty=0, top_logprobs=0)
    assert r.engine_logprobs is None


# ---------------------------------------------------------------- invalid requests

# (request class, body, param, code, words in the message)
C, CH = CompletionRequest, ChatCompletionRequest
BASE_C = {"model": "m", "prompt": "hello"}
BASE_CH = {"model": "m", "messages": MSGS}
INVALID = [
    (C, {**BASE_C, "max_tokens": True}, "max_tokens", "invalid_type", "expected an integer, but got a boolean"),
    (C, {**BASE_C, "max_tokens": "5"}, "max_tokens", "invalid_type", "got a string"),
    (C, {**BASE_C, "max_tokens": 1.5}, "max_tokens", "invalid_type", "expected an integer"),
    (C, {**BASE_C, "max_tokens": 0}, "max_tokens", "invalid_value", "greater than or equal to 1"),
    (C, {**BASE_C, "n": True}, "n", "invalid_type", "boolean"),
    (C, {**BASE_C, "n": 17}, "n", "invalid_value", "less than or equal to 16"),
    (C, {**BASE_C, "n": 0}, "n", "invalid_value", "greater than or equal to 1"),
    (C, {**BASE_C, "temperature": 2.5}, "temperature", "invalid_value", "less than or equal to 2"),
    (C, {**BASE_C, "temperature": True}, "temperature", "invalid_type", "expected a number"),
    (C, {**BASE_C, "temperature": "hot"}, "temperature", "invalid_type", "got a string"),
    (C, {**BASE_C, "top_p": 0}, "top_p", "invalid_value", "greater than 0"),
    (C, {**BASE_C, "top_k": -2}, "top_k", "invalid_value", "greater than or equal to -1"),
    (C, {**BASE_C, "seed": 1.0}, "seed", "invalid_type", "expected an integer"),
    (C, {**BASE_C, "stream": "yes"}, "stream", "invalid_type", "expected a boolean"),
    (C, {**BASE_C, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value", "only allowed when 'stream'"),
    (C, {**BASE_C, "stop": ["a", ""]}, "stop", "invalid_value", "non-empty"),
    (C, {**BASE_C, "stop": [str(i) for i in range(17)]}, "stop", "invalid_value", "at most 16"),
    (C, {**BASE_C, "stop": 5}, "stop", "invalid_type", "string or an array"),
    (C, {**BASE_C, "stop_token_ids": [1, True]}, "stop_token_ids[1]", "invalid_type", "boolean"),
    (C, {**BASE_C, "stop_token_ids": [-1]}, "stop_token_ids[0]", "invalid_value", "greater than or equal to 0"),
    (C, {**BASE_C, "logprobs": 21}, "logprobs", "invalid_value", "less than or equal to 20"),
    (C, {**BASE_C, "logprobs": True}, "logprobs", "invalid_type", "boolean"),
    (C, {**BASE_C, "min_tokens": 17}, "min_tokens", "invalid_value", "must not exceed max_tokens (16)"),
    (C, {**BASE_C, "ignore_eos": 1}, "ignore_eos", "invalid_type", "expected a boolean"),
    (C, {"model": "m", "prompt": ""}, "prompt", "invalid_value", "must not be empty"),
    (C, {"model": "m", "prompt": []}, "prompt", "invalid_value", "must not be empty"),
    (C, {"model": "m", "prompt": [[]]}, "prompt", "invalid_value", "must not be empty"),
    (C, {"model": "m", "prompt": ["a", ""]}, "prompt", "invalid_value", "prompt[1] must not be empty"),
    (C, {"model": "m", "prompt": ["a"] * 65}, "prompt", "invalid_value", "at most 64 prompts"),
    (C, {"model": "m", "prompt": ["a"] * 16, "n": 9}, "n", "invalid_value", "over the limit of 128"),
    (C, {"model": "m", "prompt": [1, True]}, "prompt", "invalid_type", "array of token ids"),
    (C, {"model": "m", "prompt": [3, -1]}, "prompt", "invalid_value", ">= 0"),
    (C, {"model": "m", "prompt": 5}, "prompt", "invalid_type", "must be a string"),
    (C, {"model": "m"}, "prompt", "missing_required_parameter", "Missing required parameter: 'prompt'"),
    (C, {"prompt": "x"}, "model", "missing_required_parameter", "Missing required parameter: 'model'"),
    (C, {"model": 3, "prompt": "x"}, "model", "invalid_type", "expected a string"),
    (C, {**BASE_C, "suffix": "end"}, "suffix", "unsupported_parameter", "not supported"),
    (C, {**BASE_C, "best_of": 3}, "best_of", "unsupported_parameter", "not supported"),
    (C, {**BASE_C, "presence_penalty": 2.5}, "presence_penalty", "invalid_value", "less than or equal to 2"),
    (C, {**BASE_C, "frequency_penalty": -2.01}, "frequency_penalty", "invalid_value", "greater than or equal to -2"),
    (C, {**BASE_C, "repetition_penalty": 0}, "repetition_penalty", "invalid_value", "greater than or equal to 0.01"),
    (C, {**BASE_C, "repetition_penalty": 5e-324}, "repetition_penalty", "invalid_value", "greater than or equal to 0.01"),  # found by the fuzzer: divided logits to inf
    (C, {**BASE_C, "repetition_penalty": 2.5}, "repetition_penalty", "invalid_value", "less than or equal to 2"),
    (C, {**BASE_C, "presence_penalty": "1"}, "presence_penalty", "invalid_type", "number"),
    (C, {**BASE_C, "logit_bias": {"50256": -101}}, "logit_bias", "invalid_value", "outside [-100, 100]"),
    (C, {**BASE_C, "logit_bias": {"abc": 1}}, "logit_bias", "invalid_value", "token ids"),
    (C, {**BASE_C, "logit_bias": {"-3": 1}}, "logit_bias", "invalid_value", "negative"),
    (C, {**BASE_C, "logit_bias": {"3": "1"}}, "logit_bias", "invalid_type", "number"),
    (CH, {"model": "m", "messages": []}, "messages", "invalid_value", "non-empty"),
    (CH, {"model": "m"}, "messages", "missing_required_parameter", "'messages'"),
    (CH, {"model": "m", "messages": "hi"}, "messages", "invalid_type", "expected an array"),
    (CH, {"model": "m", "messages": [MSGS[0], {"role": "tool", "content": "x"}]}, "messages[1].role", "unsupported_parameter", "'tool'"),
    (CH, {"model": "m", "messages": [{"role": "function", "content": "x"}]}, "messages[0].role", "unsupported_parameter", "'function'"),
    (CH, {"model": "m", "messages": [MSGS[0], MSGS[0], {"role": "bogus", "content": "x"}]}, "messages[2].role", "invalid_value", "unknown role 'bogus'"),
    (CH, {"model": "m", "messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter", "messages[0].role"),
    (CH, {"model": "m", "messages": [{"role": "user", "content": None}]}, "messages[0].content", "invalid_type", "string or an array"),
    (CH, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content", "unsupported_parameter", "only 'text'"),
    (CH, {"model": "m", "messages": [{"role": "user", "content": []}]}, "messages[0].content", "invalid_value", "empty"),
    (CH, {**BASE_CH, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "invalid_value", "disagree"),
    (CH, {**BASE_CH, "max_completion_tokens": False}, "max_completion_tokens", "invalid_type", "boolean"),
    (CH, {**BASE_CH, "min_tokens": 8, "max_completion_tokens": 4}, "min_tokens", "invalid_value", "must not exceed"),
    (CH, {**BASE_CH, "logprobs": 1}, "logprobs", "invalid_type", "expected a boolean"),
    (CH, {**BASE_CH, "top_logprobs": 2}, "top_logprobs", "invalid_value", "requires logprobs"),
    (CH, {**BASE_CH, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value", "less than or equal to 20"),
    (CH, {**BASE_CH, "response_format": {"type": "regex"}}, "response_format", "unsupported_parameter", "'regex'"),
    (CH, {**BASE_CH, "response_format": {"type": "json_schema"}}, "response_format", "invalid_type", "json_schema must be an object"),
    (CH, {**BASE_CH, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "invalid_type", "schema"),
    (CH, {**BASE_CH, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter", "not supported"),
    (CH, {**BASE_CH, "tool_choice": "auto"}, "tool_choice", "unsupported_parameter", "not supported"),
    (CH, {**BASE_CH, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter", "not supported"),
    (CH, {**BASE_CH, "stream": False, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value", "'stream'"),
    (C, {**BASE_C, "cache_salt": ""}, "cache_salt", "invalid_value", "at least 1 character"),
    (C, {**BASE_C, "cache_salt": "x" * 1025}, "cache_salt", "invalid_value", "at most 1024 characters"),
    (C, {**BASE_C, "cache_salt": 5}, "cache_salt", "invalid_type", "expected a string"),
    (CH, {**BASE_CH, "cache_salt": ["a"]}, "cache_salt", "invalid_type", "expected a string"),
]


@pytest.mark.parametrize("cls, body, param, code, words", INVALID, ids=[f"{i}-{p}" for i, (_, _, p, _, _) in enumerate(INVALID)])
def test_invalid_requests_are_400_naming_the_field(cls, body, param, code, words):
    err = api_error(cls, body)
    assert err.status == 400
    assert (err.param, err.code, err.type) == (param, code, "invalid_request_error")
    assert words in err.message
    assert f"'{param}'" in err.message  # the message names the field path too


def test_a_body_that_is_not_an_object():
    err = api_error(CompletionRequest, [1, 2])
    assert err.status == 400 and err.param is None and "expected an object" in err.message


def test_several_problems_report_the_first_and_count_the_rest():
    err = api_error(CompletionRequest, {"model": "m", "prompt": "x", "n": 0, "temperature": 9})
    assert err.param == "temperature" or err.param == "n"
    assert "1 more problem" in err.message


# ---------------------------------------------------------------- SamplingParams


def test_completion_to_sampling_params():
    r = completion(max_tokens=32, temperature=0, top_p=0.9, top_k=40, seed=7, stop_token_ids=[5, 6],
                   ignore_eos=True, min_tokens=3, logprobs=2, stop=["\n"])
    assert r.to_sampling_params() == SamplingParams(
        max_tokens=32, min_tokens=3, temperature=0.0, top_p=0.9, top_k=40, seed=7,
        stop_token_ids=(5, 6), ignore_eos=True, logprobs=2,
    )
    assert r.stop_strings == ["\n"]  # stop strings stay with the router


def test_completion_logprobs_zero_means_the_sampled_token_only():
    assert completion(logprobs=0).to_sampling_params().logprobs == 0
    assert completion().to_sampling_params().logprobs is None


def test_chat_without_length_uses_the_room_left_in_the_context():
    r = chat(min_tokens=50)
    assert r.to_sampling_params(default_max_tokens=20).max_tokens == 20
    assert r.to_sampling_params(default_max_tokens=20).min_tokens == 20  # clipped to the room
    with pytest.raises(ValueError, match="default_max_tokens"):
        r.to_sampling_params()
    assert chat(max_completion_tokens=5).to_sampling_params(default_max_tokens=100).max_tokens == 5


def test_chat_logprobs_to_engine():
    assert chat(logprobs=True).to_sampling_params(10).logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).to_sampling_params(10).logprobs == 5
    assert chat().to_sampling_params(10).logprobs is None


def test_seed_per_choice():
    r = completion(seed=100, n=3)
    assert [r.to_sampling_params(choice_index=i).seed for i in range(3)] == [100, 101, 102]
    assert completion(seed=2**64 - 1, n=2).to_sampling_params(choice_index=1).seed == 0
    assert completion(n=2).to_sampling_params(choice_index=1).seed is None


def test_top_k_minus_one_reaches_the_engine_as_disabled():
    assert completion(top_k=-1).to_sampling_params().top_k == -1


# ---------------------------------------------------------------- response shapes

USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details"}


def roundtrip(model) -> dict:
    return json.loads(model.model_dump_json())


def test_usage_shape():
    u = roundtrip(Usage.of(10, 5, cached_tokens=4))
    assert set(u) == USAGE_KEYS
    assert u == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}}


def test_completion_response_shape():
    r = roundtrip(CompletionResponse(model="m", choices=[CompletionChoice(index=0, text="hi", finish_reason="length")],
                                     usage=Usage.of(3, 2)))
    assert set(r) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert r["id"].startswith("cmpl-") and r["object"] == "text_completion" and isinstance(r["created"], int)
    assert r["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length"}]


def test_chat_response_shape():
    r = roundtrip(ChatCompletionResponse(
        model="m", usage=Usage.of(3, 2),
        choices=[ChatChoice(index=0, message=ChatResponseMessage(content="Hello!"), finish_reason="stop")],
    ))
    assert set(r) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert r["id"].startswith("chatcmpl-") and r["object"] == "chat.completion"
    assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None, "finish_reason": "stop"}]


def test_chat_chunk_shapes():
    head = dict(id="chatcmpl-1", created=1, model="m")
    first = roundtrip(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))]))
    assert set(first) == {"id", "object", "created", "model", "choices", "system_fingerprint"}  # no usage asked for
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    mid = roundtrip(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(content="Hel"))], usage=None))
    assert mid["usage"] is None and mid["choices"][0]["delta"] == {"content": "Hel"}  # include_usage: null until the end
    last = roundtrip(ChatCompletionChunk(**head, choices=[ChatChunkChoice(index=0, delta=ChatDelta(), finish_reason="stop")]))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
    usage = roundtrip(ChatCompletionChunk(**head, choices=[], usage=Usage.of(4, 3)))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 7


def test_completion_chunk_shape():
    c = roundtrip(CompletionChunk(id="cmpl-1", created=1, model="m", choices=[CompletionChoice(index=1, text="x")]))
    assert set(c) == {"id", "object", "created", "model", "choices", "system_fingerprint"}
    assert c["object"] == "text_completion"
    assert c["choices"] == [{"index": 1, "text": "x", "logprobs": None, "finish_reason": None}]
    u = roundtrip(CompletionChunk(id="cmpl-1", created=1, model="m", choices=[], usage=Usage.of(1, 1)))
    assert u["usage"]["total_tokens"] == 2


def test_model_list_shape():
    r = roundtrip(ModelList(data=[ModelCard(id="smollm2", max_model_len=2048)]))
    assert set(r) == {"object", "data"} and r["object"] == "list"
    assert set(r["data"][0]) == {"id", "object", "created", "owned_by", "max_model_len"}
    assert (r["data"][0]["object"], r["data"][0]["owned_by"], r["data"][0]["max_model_len"]) == ("model", "kvrelay", 2048)


def test_completion_logprobs_builder():
    lp = roundtrip(completion_logprobs([" a", "bc"], [-0.5, -float("inf")], [[(" a", -0.5), (" b", -1.0)], [("x", -0.1)]], text_offset=3))
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [" a", "bc"]
    assert lp["token_logprobs"] == [-0.5, -9999.0]  # JSON has no -inf
    assert lp["text_offset"] == [3, 5]
    assert lp["top_logprobs"] == [{" a": -0.5, " b": -1.0}, {"x": -0.1, "bc": -9999.0}]  # sampled token always there
    assert completion_logprobs(["a"], [-1.0]).top_logprobs is None
    with pytest.raises(ValueError):
        completion_logprobs(["a"], [])


def test_chat_logprobs_builder():
    lp = roundtrip(chat_logprobs(["é", "!"], [-0.25, math.nan], [[("é", -0.25), ("e", -2.0)], []]))
    assert set(lp) == {"content"}
    first = lp["content"][0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert first["bytes"] == [0xC3, 0xA9]
    assert first["top_logprobs"] == [{"token": "é", "logprob": -0.25, "bytes": [0xC3, 0xA9]},
                                     {"token": "e", "logprob": -2.0, "bytes": [101]}]
    assert lp["content"][1]["logprob"] == -9999.0 and lp["content"][1]["top_logprobs"] == []


# ---------------------------------------------------------------- error envelope


def test_error_envelope_shape():
    body = errors.invalid_request("bad", param="n").error_body()
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}


def test_invalid_api_key():
    missing = errors.invalid_api_key(None)
    assert (missing.status, missing.code) == (401, "invalid_api_key")
    assert "didn't provide an API key" in missing.message
    wrong = errors.invalid_api_key("sk-secret-123456789")
    assert wrong.status == 401 and "6789" in wrong.message and "secret" not in wrong.message
    assert wrong.headers == {"WWW-Authenticate": "Bearer"}


def test_model_not_found():
    e = errors.model_not_found("gpt-9")
    assert (e.status, e.code, e.param) == (404, "model_not_found", "model") and "`gpt-9`" in e.message


def test_context_length_exceeded_names_both_numbers():
    e = errors.context_length_exceeded(2048, prompt_tokens=2000, max_tokens=100)
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "messages")
    assert e.message.startswith("This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
                                "(2000 in the messages, 100 in the completion).")
    p = errors.context_length_exceeded(2048, prompt_tokens=3000, max_tokens=None, chat=False)
    assert p.param == "prompt" and "3000 tokens" in p.message


@pytest.mark.parametrize("make, status, code", [(errors.overloaded, 503, "overloaded"), (errors.rate_limited, 429, "rate_limit_exceeded")])
def test_overloaded_carries_retry_after(make, status, code):
    e = make(2.2)
    assert (e.status, e.code) == (status, code)
    assert e.headers == {"Retry-After": "3"}
    assert make(0).headers == {"Retry-After": "1"}
    assert set(e.error_body()["error"]) == {"message", "type", "param", "code"}


def test_internal_error():
    e = errors.internal_error()
    assert (e.status, e.type, e.code) == (500, "server_error", None)
    assert isinstance(e, Exception)


def test_new_sampling_fields_reach_the_engine_parameters():
    import json

    r = completion(prompt=["a", [5, 6]], echo=True, logprobs=2, presence_penalty=0.5, frequency_penalty=-0.25,
                   repetition_penalty=1.3, logit_bias={"17": 5, "3": -100}, response_format={"type": "json_object"})
    p = r.to_sampling_params()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.25, 1.3)
    assert p.logit_bias == ((17, 5.0), (3, -100.0)) and p.prompt_logprobs == 2 and p.logprobs == 2
    assert json.loads(p.json_schema) == {"type": "object"}
    assert completion(logprobs=2).to_sampling_params().prompt_logprobs is None  # only with echo
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = chat(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}})
    assert json.loads(r.to_sampling_params(default_max_tokens=8).json_schema) == schema
    assert chat(response_format={"type": "text"}).to_sampling_params(default_max_tokens=8).json_schema is None


def test_cache_salt_reaches_the_engine_as_the_namespace_the_api_resolved():
    for req in (completion(cache_salt="tenant-a"), ChatCompletionRequest.model_validate({**BASE_CH, "cache_salt": "t"})):
        assert req.cache_salt in ("tenant-a", "t")
        assert req.to_sampling_params(default_max_tokens=8, cache_namespace="salt:x").cache_namespace == "salt:x"
    assert completion(cache_salt=None).cache_salt is None  # null: the default
    assert completion().to_sampling_params().cache_namespace is None
    assert completion(cache_salt="x" * 1024).cache_salt == "x" * 1024
