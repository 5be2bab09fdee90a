"""sam_backend.http: a refused request's reason is in the log as well as in its JSON answer, since Label Studio
shows its users only the status line of an error answer."""
from __future__ import annotations

import logging

from model import SamModel
from sam_backend.http import create_app
from sam_backend.settings import Settings
from tools.harness.fake_predictor import FakePredictor


def client(**changes):
    settings = Settings(state_store="memory", **changes)
    return create_app(SamModel(FakePredictor(), settings), settings).test_client()


def test_refusals_are_logged_with_their_reason(caplog):
    app = client()
    with caplog.at_level(logging.WARNING, logger="sam_backend.http"):
        host = app.get("/health", headers={"Host": "ml.example.com"})
        typed = app.post("/predict", data="{}", content_type="text/plain")
        setup = app.post("/setup", json={"project": "1.1", "schema": "<View></View>"})
    assert host.status_code == 400 and "ALLOWED_HOSTS" in host.json["error"]
    assert typed.status_code == 415
    assert 400 <= setup.status_code < 500 and setup.json["error"]
    assert "GET /health refused with 400: Host 'ml.example.com' is not a name of this server" in caplog.text
    assert "POST /predict refused with 415" in caplog.text
    assert f"POST /setup refused with {setup.status_code}: {setup.json['error']}" in caplog.text


def test_an_answered_request_logs_no_refusal(caplog):
    with caplog.at_level(logging.WARNING, logger="sam_backend.http"):
        assert client().get("/health").status_code == 200
    assert "refused" not in caplog.text


def test_refusals_by_flask_and_the_basic_auth_are_logged_but_not_a_wrong_url(caplog):
    app = client(max_content_length=1000)
    with caplog.at_level(logging.WARNING, logger="sam_backend.http"):
        large = app.post("/predict", json={"tasks": [], "padding": "x" * 2000})
        method = app.get("/predict")
        missing = app.get("/no-such-page")
    assert (large.status_code, method.status_code, missing.status_code) == (413, 405, 404)
    assert "POST /predict refused with 413: Request Entity Too Large" in caplog.text
    assert "GET /predict refused with 405: Method Not Allowed" in caplog.text
    assert "no-such-page" not in caplog.text
    caplog.clear()
    app = client(basic_auth_user="ls", basic_auth_pass="secret-pass")
    with caplog.at_level(logging.WARNING, logger="sam_backend.http"):
        denied = app.get("/health", headers={"Authorization": "Basic bHM6d3Jvbmc="})  # ls:wrong
        scanned = app.get("/wp-login.php")
    assert denied.status_code == 401 and scanned.status_code == 401
    assert "GET /health refused with 401: no or wrong Basic auth credentials" in caplog.text
    assert "wp-login" not in caplog.text  # a wrong URL is not logged, behind Basic auth too
    assert "bHM6d3Jvbmc=" not in caplog.text and "secret-pass" not in caplog.text  # no credentials in the log


def test_a_line_break_in_a_refused_path_does_not_start_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="sam_backend.http"):
        answer = client().get("/x%0AWARNING%20forged", headers={"Host": "ml.example.com"})
    assert answer.status_code == 400
    (record,) = caplog.records
    assert record.getMessage().startswith("GET /x\\nWARNING forged refused with 400")
