"""`tokenmill serve --speculative-config ... --scheduling-policy priority` through the official
openai client: the same greedy text as without proposals, vLLM's spec_decode counters in
/metrics (parsed by prometheus_client), and the `priority` field honoured or refused."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.e2e.conftest import Server

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def spec_server():
    server = Server("--linear-backend", "aten", "--speculative-config", json.dumps(SPEC),
                    "--scheduling-policy", "priority")
    yield server
    server.stop()


def test_proposals_through_the_server(spec_server, server):
    text = open("data/demo_heldout.txt").read()[:400]
    prompt = f"Copy this text.\n{text}\nCopy:\n{text[:80]}"
    answers = []
    for s in (server, spec_server):
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none")
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=40, temperature=0,
                                      extra_body={"priority": -2} if s is spec_server else None)
        answers.append(r.choices[0].text)
    assert answers[1] == answers[0]
    m = spec_server.metrics()
    assert m["tokenmill:spec_decode_num_drafts_total"] > 0
    assert 0 < m["tokenmill:spec_decode_num_accepted_tokens_total"] <= m["tokenmill:spec_decode_num_draft_tokens_total"]
    assert m["tokenmill:spec_decode_num_accepted_tokens_per_pos_total{position=0}"] > 0
    # Without --scheduling-policy priority the field is refused, by name.
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "hi", "priority": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority", r.text
