"""Error answers say what the client did wrong (issue 24, item 8):

* a multipart body that ends before its closing boundary is 400 `bad_request` (README: "the multipart
  body cannot be parsed"), not 422 `missing_field`;
* a bad `?model=` is reported once, not once per dependency that reads it;
* no pydantic internals in a message (`Expected UploadFile, received: <class 'str'>`, `Value error, `).
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

INTERNALS = ("UploadFile", "<class", "Value error", "received:")


@pytest.fixture(scope="module")
def client(tiny_bundles):
    from app.main import create_app
    from app.settings import Settings

    with TestClient(create_app(Settings(bundle=tiny_bundles(max_length=6), device="cpu"))) as c:
        yield c


def multipart(body: bytes, boundary: str = "xx") -> dict:
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


def error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    for text in INTERNALS:
        assert text not in r.text, r.text
    return body


@pytest.mark.parametrize("path, field", [("/v1/captions", "image"), ("/v1/captions/batch", "images")])
def test_an_unterminated_multipart_body_is_a_bad_request(client, path, field):
    body = f'--xx\r\nContent-Disposition: form-data; name="{field}"; filename="a.jpg"\r\n\r\nabc'.encode()
    e = error(client.post(path, **multipart(body)), 400, "bad_request")
    assert "closing boundary" in e["message"], e


def test_a_terminated_body_with_an_epilogue_still_parses(client):
    body = b'--xx\r\nContent-Disposition: form-data; name="picture"; filename="a.jpg"\r\n\r\nabc\r\n--xx--\r\nbye'
    error(client.post("/v1/captions", **multipart(body)), 422, "missing_field")


def test_a_bad_model_is_reported_once(client):
    e = error(client.post("/v1/captions?model=../etc", files={"image": ("a.jpg", b"x", "image/jpeg")}),
              422, "validation_error")
    assert len(e["details"]) == 1, e
    assert e["message"].count("model") == 1, e["message"]
    assert "name" in e["message"] and "version" in e["message"], e["message"]


@pytest.mark.parametrize("path, field", [("/v1/captions", "image"), ("/v1/captions/batch", "images")])
def test_a_text_field_instead_of_a_file_says_so(client, path, field):
    body = f'--xx\r\nContent-Disposition: form-data; name="{field}"\r\n\r\ncat.jpg\r\n--xx--\r\n'.encode()
    e = error(client.post(path, **multipart(body)), 422, "validation_error")
    assert "file" in e["message"] and field in e["message"], e["message"]
    print(e["message"])


def test_a_wrong_type_says_what_was_expected(client):
    e = error(client.post("/v1/captions?beam_size=abc", files={"image": ("a.jpg", b"x", "image/jpeg")}),
              422, "validation_error")
    assert "beam_size" in e["message"] and "integer" in e["message"], e
