"""The OpenAI API as outside clients use it, against one live `kvrelay serve` (real
Ray, Ray Serve, a prefill and a decode worker over UCX, SmolLM2). Greedy outputs are
compared with one in-process engine's: the prefill worker samples the first token, the
decode worker the rest, so equality shows the penalty counts, the grammar state and
the prompt logprobs crossing the handoff. Penalties,
logit_bias, structured output (json_object / json_schema, 20 schemas at once), echo
with prompt logprobs, batched prompts, /tokenize and /detokenize, through the official
`openai` client and raw HTTP; and lm-eval (`local-completions` loglikelihood,
`local-chat-completions` generation) against transformers on the same items."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import pytest
import torch

from tests.integration.test_api import KEY, MODEL, _post, client, make_engine_module, server  # noqa: F401 - fixtures
from workers.sampling_params import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def engine(make_engine_module):  # noqa: F811
    return make_engine_module


def _greedy(engine, ids, **params):
    return engine.generate([ids], SamplingParams(temperature=0.0, **params))[0]


# ---------------------------------------------------------------- penalties, logit_bias


def test_penalties_and_logit_bias_through_the_openai_client(client, engine, tokenizer):  # noqa: F811
    prompt = "The list goes: one, two, one, two, one, two, one,"
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    plain = _greedy(engine, ids, max_tokens=16)
    cases = [
        ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, {}, dict(frequency_penalty=1.5, presence_penalty=0.5)),
        ({}, {"repetition_penalty": 1.4}, dict(repetition_penalty=1.4)),
        ({"logit_bias": {str(plain[0]): -100}}, {}, dict(logit_bias=((plain[0], -100.0),))),
    ]
    for kwargs, extra, params in cases:
        want = _greedy(engine, ids, max_tokens=16, **params)
        assert want != plain, params  # each setting changes the greedy output
        text = tokenizer.decode(want, skip_special_tokens=True)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body=extra, **kwargs)
        assert r.choices[0].text == text, (params, r.choices[0].text, text)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body=extra, **kwargs) if c.choices)
        assert streamed == text, params
    assert plain[0] not in _greedy(engine, ids, max_tokens=16, logit_bias=((plain[0], -100.0),))
    # a +100 bias takes over every step, in chat too (streamed)
    forced = tokenizer.encode(" banana")[0]
    chunks = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                            temperature=0, logit_bias={str(forced): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tokenizer.decode([forced] * 5)


# ---------------------------------------------------------------- structured output

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}


def test_json_schema_and_json_object_through_the_openai_client(client, engine, tokenizer):  # noqa: F811
    from pydantic import BaseModel, Field

    messages = [{"role": "user", "content": "Invent a software engineer and describe them as JSON."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=120, temperature=0, response_format=fmt)
    content = r.choices[0].message.content
    jsonschema.validate(json.loads(content), PERSON)
    # the prefill worker sampled the first token under the mask, the decode worker rebuilt
    # the matcher and advanced it by that token: the text equals one engine's
    want = _greedy(engine, tokenizer.apply_chat_template(messages), max_tokens=120, json_schema=json.dumps(PERSON))
    assert content == tokenizer.decode(want, skip_special_tokens=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=120, temperature=0, response_format=fmt, stream=True) if c.choices)
    assert streamed == content
    # sampled, not greedy: still valid
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=120, temperature=1.0, seed=3, response_format=fmt)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    # json_object: any JSON object
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about cats."}],
                                       max_tokens=150, temperature=0, response_format={"type": "json_object"},
                                       extra_body={"repetition_penalty": 1.1})
    assert isinstance(json.loads(r.choices[0].message.content), dict)

    # the client's own structured-output helper: a pydantic model as the schema, parsed back
    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)
        population_millions: int = Field(ge=0, le=50)

    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}],
                                           max_tokens=80, temperature=0, response_format=City)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def _schemas() -> list[dict]:
    s = lambda props, req=None: {"type": "object", "properties": props, "required": req or list(props),  # noqa: E731
                                 "additionalProperties": False}
    word = {"type": "string", "maxLength": 16}
    small = {"type": "integer", "minimum": 0, "maximum": 1000}
    return [
        s({"answer": word}),
        s({"yes": {"type": "boolean"}}),
        s({"count": small}),
        s({"score": {"type": "number", "minimum": 0, "maximum": 10}}),
        s({"color": {"enum": ["red", "green", "blue"]}}),
        s({"tags": {"type": "array", "items": word, "minItems": 1, "maxItems": 3}}),
        s({"name": word, "age": small}),
        s({"point": s({"x": small, "y": small})}),
        s({"status": {"const": "ok"}, "code": small}),
        s({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
        s({"items": {"type": "array", "items": s({"id": small, "label": word}), "maxItems": 2}}),
        s({"maybe": {"anyOf": [small, {"type": "null"}]}}),
        s({"kind": {"type": "string", "enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}}),
        s({"title": word, "draft": {"type": "boolean"}, "pages": small}),
        s({"matrix": {"type": "array", "items": {"type": "array", "items": small, "maxItems": 2}, "maxItems": 2}}),
        s({"email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}}),
        s({"first": word, "last": word}, ["first"]),
        s({"ratio": {"type": "number", "minimum": 0, "maximum": 1}, "ok": {"type": "boolean"}}),
        s({"nested": s({"deep": s({"value": word})})}),
        {"type": "array", "items": small, "minItems": 1, "maxItems": 4},
    ]


def test_structured_output_stress_20_schemas(client):  # noqa: F811
    schemas = _schemas()
    assert len(schemas) == 20 and len({json.dumps(x) for x in schemas}) == 20

    def one(i: int):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}}
        r = client.chat.completions.create(model=MODEL, max_tokens=120, temperature=0.7, seed=i, response_format=fmt,
                                           messages=[{"role": "user", "content": f"Answer in JSON (case {i})."}])
        return r.choices[0]

    # 3 at a time: the shared server's per-key in-flight limit (test_api.py's fixture) is 3
    with ThreadPoolExecutor(3) as pool:
        choices = list(pool.map(one, range(20)))
    for schema, choice in zip(schemas, choices):
        assert choice.finish_reason == "stop", (schema, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


# ---------------------------------------------------------------- echo, batched prompts, tokenize


def test_echo_with_prompt_logprobs_and_batched_prompts(server, engine, tokenizer):  # noqa: F811
    texts = ["Paris is the capital of", "One, two, three,"]
    ids = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    body = {"model": MODEL, "prompt": [texts[0], ids[1]], "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2, "n": 2}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == len(ids[0]) + len(ids[1])  # each prompt counted once, whatever n
    for k in range(2):
        gen = _greedy(engine, ids[k], max_tokens=3)
        engine.add_request(f"plp-{k}", ids[k], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2))
        plp = None
        while engine.has_unfinished:
            for o in engine.step():
                plp = o.prompt_logprobs or plp
        for c in out["choices"][2 * k : 2 * k + 2]:
            prompt_text = texts[k] if k == 0 else tokenizer.decode(ids[k])
            assert c["text"] == prompt_text + tokenizer.decode(gen, skip_special_tokens=True)
            lp = c["logprobs"]
            P = len(ids[k])
            assert len(lp["tokens"]) == P + len(gen) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert lp["tokens"][:P] == [tokenizer.decode([t]) for t in ids[k]]
            for p in range(1, P):
                assert abs(lp["token_logprobs"][p] - plp[p].logprob) < 1e-3
                assert 2 <= len(lp["top_logprobs"][p]) <= 3
    # streaming: the prompt comes first, then the completion
    r = httpx.post(f"{server}/v1/completions", json={**body, "prompt": texts[0], "n": 1, "stream": True},
                   headers={"authorization": f"Bearer {KEY}"}, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks).startswith(texts[0])
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_tokenize_and_detokenize(server, tokenizer):  # noqa: F811
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    ids = tokenizer.encode("Hello world", add_special_tokens=True)
    assert r.json() == {"count": len(ids), "max_model_len": 2048, "tokens": ids,
                        "token_strs": tokenizer.hf.convert_ids_to_tokens(ids)}
    messages = [{"role": "user", "content": "Hi"}]
    r = _post(server, "/tokenize", {"messages": messages})
    assert r.json()["tokens"] == tokenizer.apply_chat_template(messages) and r.json()["token_strs"] is None
    assert _post(server, "/detokenize", {"tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}
    for path, body, status in (("/detokenize", {"tokens": [10**7]}, 400), ("/tokenize", {"prompt": "x", "messages": messages}, 400),
                               ("/tokenize", {"model": "gpt-9", "prompt": "x"}, 404), ("/tokenize", {"prompt": 3}, 400)):
        r = _post(server, path, body)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, (path, body, r.text)
    assert _post(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 401


# ---------------------------------------------------------------- lm-eval


MC_ITEMS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Berlin", "Madrid"], "label": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "label": 1},
    {"question": "Which planet is closest to the sun?", "choices": ["Venus", "Mars", "Mercury"], "label": 2},
    {"question": "What color is the sky on a clear day?", "choices": ["green", "blue", "red"], "label": 1},
    {"question": "What do bees make?", "choices": ["milk", "silk", "honey"], "label": 2},
    {"question": "What is frozen water called?", "choices": ["ice", "steam", "sand"], "label": 0},
]
GEN_ITEMS = [
    {"question": "What is the capital of France? Answer with one word.", "answer": "Paris"},
    {"question": "What is 2 + 2? Answer with a number only.", "answer": "4"},
    {"question": "What color is grass? Answer with one word.", "answer": "Green"},
    {"question": "What is the opposite of hot? Answer with one word.", "answer": "Cold"},
    {"question": "Name the largest ocean. Answer with one word.", "answer": "Pacific"},
]
MC_YAML = """task: kvrelay_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN_YAML = """task: kvrelay_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 10
  do_sample: false
  temperature: 0
filter_list:
  - name: last_word
    filter:
      - function: regex
        regex_pattern: '(\\w+)\\W*$'
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
"""
LAST_WORD = r"(\w+)\W*$"  # the task's filter: the answer's last word


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory, tokenizer):
    """The two tasks as local YAML over local JSONL, and the tokenizer saved where lm-eval
    can load it: nothing is fetched from a hub."""
    d = tmp_path_factory.mktemp("lm_eval")
    for name, items, yaml in (("mc", MC_ITEMS, MC_YAML), ("gen", GEN_ITEMS, GEN_YAML)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        (d / f"{name}.yaml").write_text(yaml.format(path=d / f"{name}.jsonl"))
    tokenizer.hf.save_pretrained(d / "tokenizer")
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(d / "datasets_cache"))
    from lm_eval.tasks import TaskManager

    return d, TaskManager(include_path=str(d))


def _evaluate(task: str, model: str, model_args: dict, manager, **kw) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager,
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, **kw)


def test_lm_eval_loglikelihood_matches_transformers(server, lm_eval_tasks, hf_model, tokenizer):  # noqa: F811
    d, manager = lm_eval_tasks
    args = {"model": MODEL, "base_url": f"{server}/v1/completions", "tokenizer": str(d / "tokenizer"),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "batch_size": 4, "max_retries": 1,
            "header": {"Authorization": f"Bearer {KEY}"}}
    out = _evaluate("kvrelay_mc", "local-completions", args, manager)
    acc = out["results"]["kvrelay_mc"]["acc,none"]
    # transformers on the same items, tokenized as the harness does (context, then the
    # continuation " choice" as the tail of encoding the whole string)
    correct, lls = 0, {}
    for i, item in enumerate(MC_ITEMS):
        ctx = f"Question: {item['question']}\nAnswer:"
        scores = []
        for choice in item["choices"]:
            c_ids = tokenizer.encode(ctx)
            whole = tokenizer.encode(ctx + " " + choice)
            with torch.no_grad():
                lp = torch.log_softmax(hf_model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(float(lp[p - 1, whole[p]]) for p in range(len(c_ids), len(whole))))
        lls[i] = scores
        correct += int(max(range(3), key=scores.__getitem__) == item["label"])
    assert acc == correct / len(MC_ITEMS), (acc, correct, lls)
    assert 0 < correct < len(MC_ITEMS) or correct == len(MC_ITEMS)  # a score transformers also reaches
    for sample in out["samples"]["kvrelay_mc"]:
        got = [r[0][0] for r in sample["resps"]]
        want = lls[sample["doc_id"]]
        assert all(abs(g - w) < 2e-3 for g, w in zip(got, want)), (got, want)


def test_lm_eval_chat_generation_matches_transformers(server, lm_eval_tasks, hf_model, tokenizer):  # noqa: F811
    from lm_eval.api.metrics import exact_match_hf_evaluate

    d, manager = lm_eval_tasks
    args = {"model": MODEL, "base_url": f"{server}/v1/chat/completions", "tokenizer_backend": None,
            "tokenized_requests": False, "max_retries": 1, "header": {"Authorization": f"Bearer {KEY}"}}
    out = _evaluate("kvrelay_gen", "local-chat-completions", args, manager, apply_chat_template=True)
    em = out["results"]["kvrelay_gen"]["exact_match,last_word"]
    answers = []
    for item in GEN_ITEMS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": item["question"]}])
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
        answers.append(tokenizer.decode(gen, skip_special_tokens=True).split("\n")[0])
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in out["samples"]["kvrelay_gen"]}
    assert [by_doc[i] for i in range(len(GEN_ITEMS))] == answers
    last = [(re.findall(LAST_WORD, a) or ["[invalid]"])[0] for a in answers]
    want = exact_match_hf_evaluate(last, [x["answer"] for x in GEN_ITEMS], ignore_case=True, ignore_punctuation=True)
    assert em == want["exact_match"] and em > 0, (em, answers)
