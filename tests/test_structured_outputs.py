"""Grammar-constrained decoding on the demo model: every output follows its grammar, the
constraint leaks into no other row of the batch, survives preemption, and compiles off the
engine thread."""
from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams
from tokenmill.cli import DEMO_MODEL
from tokenmill.structured import grammars

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 10},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"]}


def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema, "maxItems": 1}
    return schema


@pytest.fixture(scope="module")
def llm():
    return LLM(DEMO_MODEL)


def _gen(llm, prompts, params):
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_each_kind_of_constraint_is_followed(llm):
    so = StructuredOutputsParams
    cases = [(so(json=SCHEMA, disable_any_whitespace=True), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             (so(json=json.dumps(SCHEMA)), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
             (so(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t) or pytest.fail(t)),
             (so(choice=["yes", "no", "it \"depends\""]), lambda t: t in ("yes", "no", 'it "depends"') or pytest.fail(t)),
             (so(grammar='root ::= "(" [a-c]+ ")"'), lambda t: re.fullmatch(r"\([a-c]+\)", t) or pytest.fail(t))]
    for temperature in (0.0, 1.0):
        params = [SamplingParams(temperature=temperature, seed=i, max_tokens=120, structured_outputs=c)
                  for i, (c, _) in enumerate(cases)]
        for out, (_, check) in zip(_gen(llm, ["The answer is"] * len(cases), params), cases):
            assert out.finish_reason == "stop", out
            check(out.text)


def test_json_object(llm):
    # Any object: an open-ended grammar, so a model may also run until max_tokens.
    outs = _gen(llm, ["The answer is"] * 8, [SamplingParams(temperature=1.0, seed=i, max_tokens=60,
                structured_outputs=StructuredOutputsParams(json_object=True)) for i in range(8)])
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert finished and all(isinstance(json.loads(o.text), dict) for o in finished)
    assert all(o.text.startswith("{") for o in outs)


def test_length_cut_mid_object_and_other_rows_untouched(llm):
    prompts = ["Hello there", "The answer is", "A list is"]
    plain = SamplingParams(temperature=0, max_tokens=12)
    alone = _gen(llm, [prompts[0]], plain)[0]
    short = SamplingParams(temperature=0, max_tokens=3, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    mixed = _gen(llm, prompts, [plain, short, SamplingParams(temperature=0, max_tokens=12,
                                                             structured_outputs=StructuredOutputsParams(regex="z+"))])
    assert mixed[0].token_ids == alone.token_ids  # the batch's bitmask constrains only its own rows
    assert mixed[1].finish_reason == "length" and len(mixed[1].token_ids) == 3
    assert set(mixed[2].text) <= {"z"}


def test_preempted_constrained_request_gives_the_same_output():
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=60,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA)) for i in range(6)]
    prompts = [f"Record number {i}:" for i in range(6)]
    roomy = _gen(LLM(DEMO_MODEL), prompts, params)
    tight = LLM(DEMO_MODEL, block_size=4, num_gpu_blocks_override=40)
    squeezed = _gen(tight, prompts, params)
    assert tight.llm_engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in roomy]
    assert tight.llm_engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("so, part", [
    (dict(json={"type": "object", "allOf": [{"required": ["a"]}]}), "'allOf' is not supported"),
    (dict(json={"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}),
     "#/properties/n: 'multipleOf'"),
    (dict(json={"type": "string", "format": "credit-card"}), "format 'credit-card'"),
    (dict(json={"type": "string", "format": "email", "maxLength": 20}), "together with 'format'"),
    (dict(json={"type": "string", "pattern": "^a+$", "minLength": 2}), "together with 'pattern'"),
    (dict(json={"type": "wat"}), 'Unsupported type "wat"'),
    (dict(regex="(unclosed"), "parenthesis is not closed"),
    (dict(json={"oneOf": [{"type": "integer"}, {"type": "number"}]}), "'oneOf' is only supported with a discriminator"),
    (dict(json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}),
     "required property 'b' is not in 'properties'"),
    (dict(json=_nested(70)), "nests deeper than 64 levels"),
    (dict(grammar="root ::= "), "EBNF parser error"),
])
def test_a_constraint_the_engine_cannot_enforce_is_refused_by_name(llm, so, part):
    with pytest.raises(ValueError, match=re.escape(part)):
        llm.generate(["x"], SamplingParams(structured_outputs=StructuredOutputsParams(**so)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_params_are_checked():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json=SCHEMA, regex="a")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs=StructuredOutputsParams(regex="a+"))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})


def test_logit_bias(llm):
    base = _gen(llm, ["Hello"], SamplingParams(temperature=0, max_tokens=6))[0]
    forced = _gen(llm, ["Hello"], SamplingParams(temperature=0, max_tokens=6, logit_bias={77: 100.0}))[0]
    assert forced.token_ids == [77] * 6
    first = base.token_ids[0]
    banned = _gen(llm, ["Hello"], SamplingParams(temperature=0, max_tokens=6, logit_bias={first: -100.0}))[0]
    assert first not in banned.token_ids[:1]
    with pytest.raises(ValueError, match="logit_bias token ids"):
        llm.generate(["x"], SamplingParams(logit_bias={10**7: 1.0}), use_tqdm=False)


def test_a_slow_grammar_compiles_off_the_engine_thread(llm, monkeypatch):
    engine = llm.llm_engine
    release, compiling = threading.Event(), threading.Event()
    real = grammars.GrammarCache._compile

    def slow(self, params, grammar=None):
        compiling.set()
        release.wait(30)
        return real(self, params, grammar)

    monkeypatch.setattr(grammars.GrammarCache, "_compile", slow)
    so = StructuredOutputsParams(json={"type": "object", "properties": {"slow": {"type": "boolean"}},
                                       "required": ["slow"]})
    engine.add_request("slow one", SamplingParams(temperature=0, max_tokens=30, structured_outputs=so), "slow")
    engine.add_request("fast one", SamplingParams(temperature=0, max_tokens=8), "fast")
    assert compiling.wait(10)
    done = {}
    while "fast" not in done:  # the other request runs to the end while the grammar compiles
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert "slow" not in done and engine.num_compiling == 1
    release.set()
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert json.loads(done["slow"].outputs[0].text)["slow"] in (True, False)
    before = engine.grammars.hits
    engine.grammars.submit(so).result()
    assert engine.grammars.hits == before + 1  # compiled once per distinct grammar


def test_a_grammar_that_fails_finishes_with_an_error_and_nothing_hangs(llm, monkeypatch):
    engine = llm.llm_engine
    nothing = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex=r"[^\s\S]"))
    out = llm.generate(["x"], nothing, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "error" and "matches no output" in out.stop_reason and out.token_ids == []

    def broken(self, params, grammar=None):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(grammars.GrammarCache, "_compile", broken)
    engine.add_request("y", SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(
        regex="q{3}")), "broken")
    outs = []
    while engine.has_unfinished_requests():  # the failed request is reported, then nothing is left
        outs += engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("broken", "error")]
    assert "compiler exploded" in outs[0].outputs[0].stop_reason
    assert engine.block_manager.num_used_blocks == 0 and not engine.requests


def test_property_order_is_the_schema_s_own(llm):
    # The cache key keeps key order: two schemas differing only in it are two grammars.
    a = {"type": "object", "properties": {"omega": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "beta": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["omega", "beta"]}
    b = {"type": "object", "properties": dict(reversed(list(a["properties"].items()))), "required": ["beta", "omega"]}
    outs = _gen(llm, ["Order:"] * 2, [SamplingParams(temperature=0, max_tokens=40,
                                                     structured_outputs=StructuredOutputsParams(json=s)) for s in (a, b)])
    assert [list(json.loads(o.text)) for o in outs] == [["omega", "beta"], ["beta", "omega"]]
