"""Secrets in the forms a destination echoes them (JSON as PHP writes it, percent-encoded,
HTML-escaped), URL credentials in their common spellings (``https://KEY:@host``,
``?code=``, ``?pwd=``, ``?pass=``), and settings errors without the values: none of
them shows a secret in clear (security review findings 1, 2 and 7)."""

from __future__ import annotations

import base64
import html
import json
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.hooks import (
    MASK,
    Hook,
    hook_secrets,
    mask_url,
    masked_secrets,
    parse_hook,
    restore_secrets,
    scrub,
    secret_forms,
    sensitive_param,
    sent_secrets,
    url_secrets,
)
from engine.settings import Settings

BASE64_TOKEN = "Zm9vYmFy/c2VjcmV0+dG9rZW4="  # base64 tokens hold "/", "+" and "="
AWKWARD = "pä\"w<&>'/ +=%-SECRET"  # every character some escaping rewrites
API_KEY = "sk_live_51SECRETKEYvalue"


def hook(http_batch: dict[str, Any]) -> Hook:
    return parse_hook({"name": "n", "account_id": 1, "actions": ["click"], "id": 3,
                       "target": {"http_batch": http_batch}})


def php_json(value: Any) -> str:
    """What PHP's ``json_encode`` writes by default: "/" as "\\/", non-ASCII as \\u."""
    return json.dumps(value).replace("/", "\\/")


def go_json(value: Any) -> str:
    """What Go's ``encoding/json`` writes by default: <, > and & as \\u escapes."""
    return (json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("&", "\\u0026"))


def encode_uri_component(value: str) -> str:
    return quote(value, safe="!'()*")


ECHOES = {
    "php json_encode": lambda s: php_json({"Authorization": f"Bearer {s}"}),
    "php json_encode, unicode kept": lambda s: json.dumps(
        {"Authorization": f"Bearer {s}"}, ensure_ascii=False).replace("/", "\\/"),
    "go encoding/json": lambda s: go_json({"Authorization": f"Bearer {s}"}),
    "percent-encoded": lambda s: f"/h?echo={quote(s, safe='')}",
    "form-encoded": lambda s: f"echo={quote_plus(s, safe='')}",
    "encodeURIComponent": lambda s: f"/h?echo={encode_uri_component(s)}",
    "html.escape": lambda s: f"<td>{html.escape(s)}</td>",
    "html, quotes kept": lambda s: f"<pre>{html.escape(s, quote=False)}</pre>",
    "markupsafe / go html": lambda s: "<td>" + html.escape(s, quote=False).replace(
        '"', "&#34;").replace("'", "&#39;") + "</td>",
    "php htmlspecialchars": lambda s: "<td>" + html.escape(s, quote=False).replace(
        '"', "&quot;").replace("'", "&#039;") + "</td>",
}


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES)
@pytest.mark.parametrize("secret", [BASE64_TOKEN, AWKWARD], ids=["base64", "awkward"])
def test_a_bearer_token_echoed_in_any_common_escaping_is_masked(echo: Any, secret: str) -> None:
    """The list dead letters (``hook_secrets``) and the HTTP transport's answers
    (``sent_secrets`` of the settings) are masked with."""
    text = echo(secret)
    h = hook({"url": "https://r.example.com/h", "auth": {"kind": "bearer", "token": secret}})
    for secrets in (hook_secrets(h), sent_secrets(h.to_storage())):
        masked = scrub(text, secrets)
        assert "SECRET" not in masked and "c2VjcmV0" not in masked, masked
        assert MASK in masked


def test_the_php_echo_of_the_review_reads_with_the_mask() -> None:
    h = hook({"url": "https://crm.example.com/h",
              "auth": {"kind": "bearer", "token": BASE64_TOKEN}})
    error = ('Rejected: HTTP 401: status is not 200; body: {"Authorization":"Bearer '
             + BASE64_TOKEN.replace("/", "\\/") + '"}')
    assert scrub(error, hook_secrets(h)) == \
        f'Rejected: HTTP 401: status is not 200; body: {{"Authorization":"Bearer {MASK}"}}'


@pytest.mark.parametrize("echo", ECHOES.values(), ids=ECHOES)
def test_url_credentials_and_headers_echoed_escaped_are_masked(echo: Any) -> None:
    """A header's value, a URL password and the Basic authorization made of it, echoed in
    each escaping."""
    basic = base64.b64encode(f"crm:{AWKWARD}".encode()).decode()
    h = hook({"url": f"https://crm:{quote(AWKWARD, safe='')}@r.example.com/h",
              "headers": {"X-Api-Key": BASE64_TOKEN}})
    secrets = hook_secrets(h)
    for secret in (AWKWARD, BASE64_TOKEN, basic):
        masked = scrub(echo(secret), secrets)
        assert "SECRET" not in masked and "c2VjcmV0" not in masked, masked
        assert basic[:12] not in masked


def test_a_query_credential_is_masked_as_the_http_client_sends_it() -> None:
    """yarl percent-encodes what a URL holds unencoded (``"`` and ``ä`` here) and
    decodes escapes of unreserved characters (``%7E``): a destination echoing its
    request URL shows that form."""
    url = 'https://r.example.com/h?token=tä"k%7E-SECRET&x=1'
    sent = "t%C3%A4%22k~-SECRET"  # yarl's form
    for secrets in (url_secrets(url), sent_secrets({"url": url})):
        assert sent in secrets
    h = hook({"url": url})
    echoed = f"POST /h?token={sent}&x=1 HTTP/1.1"
    assert scrub(echoed, hook_secrets(h)) == f"POST /h?token={MASK}&x=1 HTTP/1.1"


def test_forms_are_few_and_one_for_a_plain_secret() -> None:
    """The lists are matched against each failed delivery's error and each judged answer:
    a plain token adds no form, the worst case a bounded number."""
    assert secret_forms("tok-SECRET_1.2~") == ["tok-SECRET_1.2~"]
    assert len(secret_forms(BASE64_TOKEN)) == 3
    assert len(secret_forms(AWKWARD)) <= 13
    assert secret_forms("\ud800x") == ["\ud800x", "\\ud800x"]  # no UTF-8: no %-form
    h = hook({"url": "https://u:pw-SECRET@r.example.com/h?token=qt-SECRET",
              "headers": {"X-Api-Key": "key-SECRET", "X-Auth-Token": BASE64_TOKEN}})
    # the password, its Basic form (with its %-form: "="), the query value, the headers
    # (the base64 one in three forms)
    assert len(sent_secrets(h.to_storage())) == 8


ALPHABET = st.sampled_from("ab\\%&/*")


@given(st.text(ALPHABET, max_size=30), st.lists(st.text(ALPHABET, max_size=4), max_size=6))
def test_scrub_skipping_secrets_with_a_mark_the_text_lacks_masks_as_replacing_all(
        text: str, secrets: list[str]) -> None:
    """``scrub`` does not search for a secret holding "\\", "%" or "&" in a text without
    it: the result is that of replacing every secret, longest first."""
    expected = text
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        expected = expected.replace(secret, MASK)
    assert scrub(text, secrets) == expected


# --- URL credentials -------------------------------------------------------------------


def test_a_user_name_with_an_empty_password_is_masked_and_scrubbed() -> None:
    """``https://KEY:@host`` (an API key as ``curl -u KEY:`` sends it): the key is the
    credential; the HTTP client sends it as Basic ``KEY:``."""
    url = f"https://{API_KEY}:@api.example.com/v1/hook?x=1"
    assert mask_url(url) == f"https://{MASK}:@api.example.com/v1/hook?x=1"
    assert url_secrets(url) == [API_KEY]
    h = hook({"url": url})
    assert API_KEY not in json.dumps(h.display()) and API_KEY not in repr(h)
    basic = base64.b64encode(f"{API_KEY}:".encode()).decode()
    assert {API_KEY, basic} <= set(hook_secrets(h))
    assert scrub(f"Authorization: Basic {basic}", hook_secrets(h)) == f"Authorization: Basic {MASK}"
    # as before: a password is masked, the user name shown; no user-info: nothing masked
    assert mask_url("https://crm:pw@h.example/x") == f"https://crm:{MASK}@h.example/x"
    assert mask_url("https://h.example/x") == "https://h.example/x"
    assert mask_url("https://:@h.example/x") == f"https://:{MASK}@h.example/x"


def test_a_masked_user_name_is_restored_when_sent_back_and_refused_as_new() -> None:
    stored = hook({"url": f"https://{API_KEY}:@api.example.com/v1/hook"})
    shown = stored.display()
    restored = restore_secrets(shown, stored)
    assert restored["target"]["http_batch"]["url"] == f"https://{API_KEY}:@api.example.com/v1/hook"
    assert masked_secrets(parse_hook(shown)) == ["target.http_batch.url"]


@pytest.mark.parametrize("name", ["code", "Code", "pwd", "db_pwd", "pass", "user_pass",
                                  "db-pass", "userPass", "USER_PASS", "passcode", "pas%73"])
def test_query_credentials_named_code_pwd_pass_are_masked(name: str) -> None:
    url = f"https://fn.example.net/api/hook?tenant=acme&{name}=AzKey%2FSECRET==&x=1"
    assert sensitive_param(name)
    h = hook({"url": url})
    shown = h.display()["target"]["http_batch"]["url"]
    assert shown == f"https://fn.example.net/api/hook?tenant=acme&{name}={MASK}&x=1"
    assert {"AzKey%2FSECRET==", "AzKey/SECRET=="} <= set(hook_secrets(h))
    assert restore_secrets(h.display(), h)["target"]["http_batch"]["url"] == url
    assert masked_secrets(parse_hook(h.display())) == ["target.http_batch.url"]


@pytest.mark.parametrize("name", ["zip_code", "country_code", "codes", "bypass", "passenger",
                                  "PASSENGER", "pass_through", "compass", "tenant"])
def test_query_names_that_only_look_like_credentials_are_shown(name: str) -> None:
    """A value taken for a credential is masked in every error text: ?country_code=US
    would mask each "US"."""
    assert not sensitive_param(name)
    url = f"https://r.example.com/h?{name}=US"
    assert mask_url(url) == url and url_secrets(url) == []


# --- settings --------------------------------------------------------------------------


def test_a_settings_error_names_the_field_and_reason_never_the_value() -> None:
    url = "redis://admin:Sup3rS3cretPw@127.0.0.1:6379/13?bogus=1"
    with pytest.raises(ValidationError) as info:
        Settings(REDIS_URL=url)
    text = str(info.value)
    assert "S3cr" not in text and "admin" not in text and "input_value" not in text
    assert "REDIS_URL" in text and "not a URL redis-py can use: unknown option 'bogus'" in text
    with pytest.raises(ValidationError) as info:
        Settings(REDIS_URL="http://admin:Sup3rS3cretPw@h/0", PARTITIONS=0)
    text = str(info.value)
    assert "S3cr" not in text
    assert "REDIS_URL\n  String should match pattern" in text
    assert "PARTITIONS\n  Input should be greater than or equal to 1" in text
