"""Loading policies: tenant overrides, keys, and what happens with bad files."""

from __future__ import annotations

import hashlib

import pytest

from gateway.policy.store import PolicyStore, merge
from gateway.yamlfile import ConfigError


def store(tmp_path, files: dict[str, str], **kw) -> PolicyStore:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return PolicyStore(tmp_path, **kw)


def test_merge_is_deep_for_mappings_and_replaces_the_rest():
    base = {"strictness": 40, "prompt": {"check": True, "action": "block"}, "categories": {"SEX": 10}}
    over = {"prompt": {"action": "flag"}, "categories": {"MIS": 60}, "strictness": "loose"}
    assert merge(base, over) == {"strictness": "loose", "prompt": {"check": True, "action": "flag"},
                                 "categories": {"SEX": 10, "MIS": 60}}


def test_tenants_inherit_the_defaults_but_not_the_default_keys(tmp_path):
    s = store(tmp_path, {
        "default.yaml": "strictness: strict\napi_keys: [default-key-1]\nresponse: {action: flag}\n",
        "acme.yaml": "tenant: acme\napi_keys: [acme-key-01]\nprompt: {action: shadow}\n",
    }).current
    acme = s.tenants["acme"]
    assert (acme.strictness, acme.prompt.action, acme.response.action) == ("strict", "shadow", "flag")
    assert acme.api_keys == ["acme-key-01"]
    assert s.for_api_key("default-key-1").tenant == "default"
    assert s.for_api_key("acme-key-01").tenant == "acme"
    assert s.for_api_key("nope-nope-nope") is None and s.for_api_key(None) is None


def test_hashed_keys_match_the_plain_key(tmp_path):
    digest = hashlib.sha256(b"sk-secret-777").hexdigest()
    s = store(tmp_path, {"t.yaml": f"tenant: t\napi_keys: ['sha256:{digest.upper()}']\n"}).current
    assert s.for_api_key("sk-secret-777").tenant == "t"
    assert s.for_api_key(f"sha256:{digest}") is None  # the hash itself is not a key


def test_without_keys_everyone_gets_the_default(tmp_path):
    s = store(tmp_path, {"default.yaml": "strictness: 33\n"}).current
    assert s.open and s.for_api_key(None).strictness == 33 and s.for_api_key("anything").tenant == "default"


def test_without_default_yaml_the_builtin_defaults_apply(tmp_path):
    d = store(tmp_path, {}).current.default
    assert (d.strictness, d.prompt.action, d.response.action, d.on_guard_error) == ("moderate", "block", "block", "closed")


def test_a_bad_file_fails_the_start(tmp_path):
    with pytest.raises(ConfigError, match=r"t.yaml:2: on_guard_error"):
        store(tmp_path, {"t.yaml": "tenant: t\non_guard_error: sometimes\n"})


def test_default_file_cannot_name_another_tenant(tmp_path):
    with pytest.raises(ConfigError, match="default policy's tenant must be 'default'"):
        store(tmp_path, {"default.yaml": "tenant: acme\n"})


def test_short_or_malformed_keys_are_refused_without_echoing_them(tmp_path):
    with pytest.raises(ConfigError) as e:
        store(tmp_path, {"t.yaml": "tenant: t\napi_keys: [zq9x, 'sha256:abc']\n"})
    assert "api_keys.0: a plain key has at least 8 characters" in str(e.value)
    assert "api_keys.1: a hashed key is 'sha256:' followed by 64 hex digits" in str(e.value)
    assert "zq9x" not in str(e.value) and "sha256:abc" not in str(e.value)


def test_not_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        PolicyStore(tmp_path / "missing")


def test_reload_keeps_the_last_good_version_of_each_file(tmp_path):
    s = store(tmp_path, {"a.yaml": "tenant: a\nstrictness: 10\n", "b.yaml": "tenant: b\nstrictness: 20\n"})
    (tmp_path / "a.yaml").write_text("tenant: a\nstrictness: 999\n")
    (tmp_path / "b.yaml").write_text("tenant: b\nstrictness: 25\n")
    (tmp_path / "c.yaml").write_text("tenant: [\n")
    assert s.reload_if_changed()
    cur = s.current
    assert cur.tenants["a"].strictness == 10 and cur.tenants["b"].strictness == 25
    assert set(cur.errors) == {"a.yaml", "c.yaml"} and "c" not in cur.tenants
    assert not s.reload_if_changed()  # nothing changed since


# ----- fail safe: a reload never opens the gateway up -----

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n", "   \n"])
def test_an_empty_file_is_invalid(tmp_path, text):
    with pytest.raises(ConfigError, match="empty"):
        store(tmp_path, {"default.yaml": text})


def test_an_emptied_default_with_the_only_keys_keeps_the_gateway_closed(tmp_path):
    s = store(tmp_path, {"default.yaml": "api_keys: [only-key-001]\n"})
    (tmp_path / "default.yaml").write_text("")
    assert s.reload_if_changed()
    assert not s.current.open and s.current.for_api_key(None) is None
    assert s.current.for_api_key("only-key-001").tenant == "default"
    assert "empty" in s.current.errors["default.yaml"]


def test_a_tenant_file_that_loses_its_keys_keeps_its_last_good_version(tmp_path):
    s = store(tmp_path, {"default.yaml": "strictness: moderate\n",
                         "acme.yaml": "tenant: acme\napi_keys: [acme-key-001]\nstrictness: strict\n"})
    (tmp_path / "acme.yaml").write_text("tenant: acme\n")
    s.reload_if_changed()
    assert s.current.for_api_key("acme-key-001").strictness == "strict"  # still acme's own policy
    assert s.current.for_api_key(None) is None  # and still closed to everyone else
    assert "had keys and now has none" in s.current.errors["acme.yaml"]


def test_a_reload_that_would_remove_every_key_is_refused_whole(tmp_path):
    s = store(tmp_path, {"default.yaml": "strictness: moderate\n",
                         "acme.yaml": "tenant: acme\napi_keys: [acme-key-001]\n"})
    (tmp_path / "acme.yaml").unlink()  # a valid change on its own: deleting a tenant
    s.reload_if_changed()
    assert not s.current.open and s.current.for_api_key("acme-key-001").tenant == "acme"
    assert "would open the gateway" in s.current.errors["*"]


def test_no_keys_anywhere_needs_allow_open(tmp_path):
    with pytest.raises(ConfigError, match="allow_open"):
        store(tmp_path, {"default.yaml": "strictness: moderate\n"}, allow_open=False)
    assert PolicyStore(tmp_path, allow_open=True).current.open


def test_a_non_utf8_file_is_reported_and_other_files_still_reload(tmp_path):
    s = store(tmp_path, {"default.yaml": "strictness: moderate\n",
                         "acme.yaml": "tenant: acme\napi_keys: [acme-key-001, acme-key-002]\n",
                         "beta.yaml": "tenant: beta\napi_keys: [beta-key-001]\n"})
    (tmp_path / "beta.yaml").write_bytes(b"tenant: beta\napi_keys: [beta-key-001]\n# caf\xe9\n")
    (tmp_path / "acme.yaml").write_text("tenant: acme\napi_keys: [acme-key-002]\n")  # a revoked key
    s.reload_if_changed()
    assert s.current.for_api_key("acme-key-001") is None  # the revocation took effect
    assert s.current.for_api_key("beta-key-001").tenant == "beta"  # beta's last good version
    assert "not UTF-8" in s.current.errors["beta.yaml"]


def test_yaml_aliases_and_huge_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="aliases"):
        store(tmp_path, {"default.yaml": BOMB})
    (tmp_path / "default.yaml").write_text("strictness: moderate\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than"):
        PolicyStore(tmp_path)
