"""Stored responses: count, size and TTL limits evict (LRU first), one API key never sees another's,
and reasoning sealed for stateless clients opens only untouched."""

from __future__ import annotations

import httpx
import pytest
from openai.types.responses import ResponseItemList

from server.app import create_app
from server.launch import server_settings
from server.responses_api.sealing import ReasoningSeal, SealError
from server.responses_api.store import ResponseStore, StoreLimits
from server.settings import ServerSettings
from server_fixtures import LiveServer, save_tiny_llama, tiny_engine
from test_server_cli import parse

pytestmark = pytest.mark.timeout(300)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def response(response_id: str, text: str = "") -> dict:
    return {"id": response_id, "output": [{"type": "message", "content": [{"type": "output_text", "text": text}]}]}


def test_count_limit_evicts_the_least_recently_used():
    store = ResponseStore(StoreLimits(max_items=2))
    store.put("k", response("a"), [])
    store.put("k", response("b"), [])
    assert store.get("k", "a") is not None  # a is now more recent than b
    store.put("k", response("c"), [])
    assert [rid for rid in "abc" if store.get("k", rid)] == ["a", "c"]


def test_size_limit_evicts_until_the_bytes_fit_and_refuses_what_never_fits():
    store = ResponseStore(StoreLimits(max_bytes=1000))
    for index in range(5):
        store.put("k", response(f"r{index}", "x" * 300), [])
    assert 0 < store.size_bytes <= 1000 and len(store) == 2
    assert store.get("k", "r4") and store.get("k", "r3") and not store.get("k", "r2")
    store.put("k", response("huge", "x" * 2000), [])
    assert store.get("k", "huge") is None and len(store) == 2


def test_entries_expire_after_the_ttl():
    clock = Clock()
    store = ResponseStore(StoreLimits(ttl_seconds=10), clock=clock)
    store.put("k", response("a"), [])
    clock.now = 9
    assert store.get("k", "a") is not None
    clock.now = 10
    assert store.get("k", "a") is None and len(store) == 0 and store.size_bytes == 0


def test_an_owner_never_reads_or_deletes_another_owners_entries():
    store = ResponseStore()
    store.put("key-a", response("a"), [])
    assert store.get("key-b", "a") is None and not store.delete("key-b", "a")
    assert store.delete("key-a", "a") and store.get("key-a", "a") is None


def test_seal_opens_only_what_it_sealed_unchanged():
    seal = ReasoningSeal.from_environment()
    blob = seal.seal("step 1: think")
    assert seal.open(blob) == "step 1: think"
    raw = bytearray(blob.encode())
    raw[20] = ord("A") if raw[20] != ord("A") else ord("B")
    for bad in (raw.decode(), blob[:-4], "not base64!", ReasoningSeal.from_environment().seal("x")):
        with pytest.raises(SealError):
            seal.open(bad)


def test_a_shared_key_from_the_environment_opens_across_servers(monkeypatch):
    monkeypatch.setenv("MINERVA_REASONING_KEY", "a secret shared by the replicas")
    assert ReasoningSeal.from_environment().open(ReasoningSeal.from_environment().seal("t")) == "t"


def test_store_flags_become_settings():
    settings = server_settings(parse("m", "--responses-store-items", "5", "--responses-store-mib", "2",
                                     "--responses-store-ttl", "60"))
    assert (settings.responses_store.max_items, settings.responses_store.max_bytes,
            settings.responses_store.ttl_seconds) == (5, 2 * 1024 * 1024, 60)
    with pytest.raises(SystemExit):
        parse("m", "--responses-store-items", "0")


# --- through the server --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    engine = tiny_engine(save_tiny_llama(tmp_path_factory.mktemp("store") / "tiny"))
    app = create_app({"tiny": engine}, ServerSettings(api_keys=("sk-a", "sk-b")))
    server = LiveServer(app)
    yield server, app
    server.stop()


def client(server: LiveServer, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def test_stored_responses_continue_list_and_delete_for_their_own_key_only(live):
    server, _ = live
    with client(server, "sk-a") as a, client(server, "sk-b") as b:
        first = a.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 3}).json()
        rid = first["id"]
        assert a.get(f"/v1/responses/{rid}").json() == first
        for request in (b.get(f"/v1/responses/{rid}"), b.get(f"/v1/responses/{rid}/input_items"),
                        b.delete(f"/v1/responses/{rid}"),
                        b.post("/v1/responses", json={"input": "more", "previous_response_id": rid})):
            assert request.status_code == 404 and request.json()["error"]["code"] == "response_not_found"

        second = a.post("/v1/responses", json={"input": "Again", "previous_response_id": rid,
                                               "max_output_tokens": 3}).json()
        listed = a.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()
        ResponseItemList.model_validate(listed)
        assert [item["type"] for item in listed["data"]] == ["message", "message", "message"]
        assert listed["data"][1] == first["output"][0] and listed["data"][2]["content"][0]["text"] == "Again"
        page = a.get(f"/v1/responses/{second['id']}/input_items", params={"limit": 1, "after": listed["data"][2]["id"]})
        assert page.json()["data"][0]["id"] == listed["data"][1]["id"] and page.json()["has_more"]

        unstored = a.post("/v1/responses", json={"input": "x", "max_output_tokens": 1, "store": False}).json()
        assert a.get(f"/v1/responses/{unstored['id']}").status_code == 404
        assert a.delete(f"/v1/responses/{rid}").json() == {"id": rid, "object": "response.deleted", "deleted": True}
        assert a.get(f"/v1/responses/{rid}").status_code == 404


def test_sealed_reasoning_is_opened_when_sent_back_and_tampering_is_a_400(live):
    server, app = live
    blob = app.state.responses.seal.seal("the user wants a greeting")
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": blob}
    with client(server, "sk-a") as a:
        body = {"input": [{"role": "user", "content": "Hi"}, reasoning, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Again"}], "max_output_tokens": 1,
                "include": ["reasoning.encrypted_content"]}
        made = a.post("/v1/responses", json=body)
        assert made.status_code == 200, made.text
        items = a.get(f"/v1/responses/{made.json()['id']}/input_items", params={"order": "asc"}).json()["data"]
        assert items[1]["content"] == [{"type": "reasoning_text", "text": "the user wants a greeting"}]

        changed = blob[:-6] + ("AAAA==" if not blob.endswith("AAAA==") else "BBBB==")
        tampered = {**reasoning, "encrypted_content": changed}
        refused = a.post("/v1/responses", json={**body, "input": [body["input"][0], tampered]})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "input.1.encrypted_content"
        assert refused.json()["error"]["code"] == "invalid_encrypted_content"
