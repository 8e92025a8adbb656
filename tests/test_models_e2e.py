"""GET /v1/models and /v1/models/{id} through the openai SDK: what the upstream lists, behind the gateway's keys."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_models_retrieve_returns_a_listed_model(client):
    model = client.models.retrieve("stand-in-model")
    assert (model.id, model.object, model.owned_by) == ("stand-in-model", "model", "standin")


def test_models_retrieve_works_for_ids_with_slashes(client, upstream):
    upstream.models = ["stand-in-model", "meta-llama/Llama-3.1-8B-Instruct"]
    assert client.models.retrieve("meta-llama/Llama-3.1-8B-Instruct").id == "meta-llama/Llama-3.1-8B-Instruct"


def test_unknown_model_is_404_model_not_found_in_openai_shape(gateway, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"
    assert e.value.body["type"] == "invalid_request_error" and "no-such-model" in e.value.body["message"]
    r = httpx.get(f"{gateway.url}/v1/models/no-such-model")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_models_retrieve_needs_a_known_key(make_gateway):
    gw = make_gateway(files={"acme.yaml": "tenant: acme\napi_keys: [acme-key-0001]\n"})
    with pytest.raises(openai.AuthenticationError) as e:
        gw.client(api_key="wrong-key-0001").models.retrieve("stand-in-model")
    assert e.value.code == "invalid_api_key"
    assert gw.client(api_key="acme-key-0001").models.retrieve("stand-in-model").id == "stand-in-model"


def test_upstream_error_on_the_model_list_comes_back_unchanged(client, upstream):
    upstream.status = 503
    with pytest.raises(openai.InternalServerError) as e:
        client.models.retrieve("stand-in-model")
    assert e.value.status_code == 503
