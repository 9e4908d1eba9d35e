"""A Triton model repository with several models, one of them broken: the others are served,
each with its own engine, picked by name on every entrypoint; the broken one is reported not
ready with its reason."""
from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Server

DEMO = Path(__file__).resolve().parents[2] / "tokenmill" / "demo_model"

CONFIG = """
name: "{name}"
backend: "tokenmill"
max_batch_size: 8
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [ {{ name: "input_ids" data_type: TYPE_UINT32 dims: [ -1 ] }} ]
parameters {{ key: "dtype" value: {{ string_value: "float32" }} }}
parameters {{ key: "max_model_len" value: {{ string_value: "{max_len}" }} }}
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name, versions, max_len in (("chat", (1, 3), 256), ("tiny", (1,), 128)):
        (root / name).mkdir()
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, max_len=max_len))
        for v in versions:
            (root / name / str(v)).symlink_to(DEMO)
    (root / "broken").mkdir()
    (root / "broken" / "config.pbtxt").write_text(CONFIG.format(name="broken", max_len=64))
    (root / "broken" / "1").mkdir()  # a version folder without weights
    return root


@pytest.fixture(scope="module")
def repo_server(repository):
    from tests.e2e.conftest import free_port

    s = Server("--model-repository", str(repository), "--metrics-port", str(port := free_port()),
               served_model_name=False)
    s.metrics_port = port
    yield s
    s.stop()


def test_repository_serves_the_good_models_and_reports_the_broken_one(repo_server):
    url = repo_server.url
    index = {m["name"]: m for m in httpx.post(f"{url}/v2/repository/index").json()}
    assert index["chat"] == {"name": "chat", "version": "3", "state": "READY"}  # the highest version
    assert index["tiny"]["state"] == "READY"
    assert index["broken"]["state"] == "UNAVAILABLE" and "config.json" in index["broken"]["reason"]
    assert sorted(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]) == ["chat", "tiny"]
    limits = {m["id"]: m["max_model_len"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert limits == {"chat": 256, "tiny": 128}  # each model has its own engine and settings
    assert httpx.get(f"{url}/v2/models/chat/versions/3/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/chat/versions/1").status_code == 404  # only the highest is served
    broken = httpx.get(f"{url}/v2/models/broken/ready")
    assert broken.status_code == 503 and "config.json" in broken.json()["error"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "not ready" in r.json()["error"]["message"]
    # The OpenAI routes pick the engine by `model`.
    for name in ("chat", "tiny"):
        r = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "The Python interpreter",
                                                      "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == name
    assert httpx.get(f"{url}/health").status_code == 200


def test_grpc_picks_the_model_and_metrics_carry_its_name(repo_server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(f"127.0.0.1:{repo_server.grpc_port}")
    assert client.is_model_ready("tiny") and not client.is_model_ready("broken")
    ids = np.array([[263, 79, 323]], dtype=np.uint32)
    inputs = []
    for name, a in (("input_ids", ids), ("input_lengths", np.array([[3]], np.uint32)),
                    ("request_output_len", np.array([[4]], np.uint32))):
        t = grpcclient.InferInput(name, a.shape, "UINT32")
        t.set_data_from_numpy(a)
        inputs.append(t)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["chat"].version == "3" and index["broken"].state == "UNAVAILABLE" and index["broken"].reason
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as exc:  # an RPC tokenmill does not serve
        client.get_model_config("tiny")
    assert "UNIMPLEMENTED" in str(exc.value.status())
    result = client.infer("tiny", inputs)
    assert result.get_response().model_name == "tiny" and result.as_numpy("sequence_length")[0, 0] == 7
    text = httpx.get(f"{repo_server.url}/metrics").text
    assert 'tokenmill:generation_tokens_total{model_name="tiny"}' in text
    # --metrics-port serves the same families on their own port, as Triton does on 8002.
    assert 'tokenmill:generation_tokens_total{model_name="tiny"}' in httpx.get(
        f"http://127.0.0.1:{repo_server.metrics_port}/metrics").text
    assert 'tokenmill:num_requests_running{model_name="chat"}' in text
