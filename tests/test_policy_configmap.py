"""Policies from a Kubernetes ConfigMap volume: the kubelet's symlink-swap layout, reloaded while running.

The kubelet writes each version of a ConfigMap into a fresh hidden folder (`..2026_12_04_02_50_00.1`),
points `..data` at it with an atomic rename, and shows each key as `name -> ..data/name`; the file a
key names is never edited in place. Here the same layout is made on disk, version by version.
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from pathlib import Path

import httpx

from gateway.policy.store import PolicyStore

_versions = itertools.count(1)


class ConfigMapVolume:
    """A folder laid out and updated the way the kubelet's atomic writer does it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def publish(self, files: dict[str, str], *, mtime_ns: int | None = None) -> None:
        """A new version of the ConfigMap. mtime_ns: stamp every file with it (files written within one tick
        of the filesystem clock look alike by mtime)."""
        data = self.root / "..data"
        old = data.resolve() if data.is_symlink() else None
        version = self.root / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{next(_versions)}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text)
            if mtime_ns is not None:
                os.utime(version / name, ns=(mtime_ns, mtime_ns))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, data)  # the one atomic step: every key switches at once
        for name in files:
            if not (self.root / name).is_symlink():
                (self.root / name).symlink_to(f"..data/{name}")
        for link in self.root.iterdir():
            if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
                link.unlink()
        if old is not None:
            shutil.rmtree(old)


DEFAULT = "strictness: moderate\napi_keys: [default-key-0001]\n"


def acme(key: str, strictness: str = "strict") -> str:
    return f"tenant: acme\napi_keys: [{key}]\nstrictness: {strictness}\n"


def test_policies_load_from_a_configmap_volume(tmp_path):
    volume = ConfigMapVolume(tmp_path / "policies")
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0001")})
    current = PolicyStore(volume.root).current
    assert sorted(current.tenants) == ["acme", "default"] and current.errors == {}
    assert current.for_api_key("acme-key-0001").tenant == "acme"


def test_a_configmap_update_is_picked_up_even_when_size_and_mtime_look_unchanged(tmp_path):
    volume = ConfigMapVolume(tmp_path / "policies")
    stamp = time.time_ns()
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0001")}, mtime_ns=stamp)
    store = PolicyStore(volume.root, 0)
    assert store.reload_if_changed() is False
    # A new key of the same length, written as new files stamped alike: only the files' identity changed.
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0002")}, mtime_ns=stamp)
    assert store.reload_if_changed() is True
    assert store.current.for_api_key("acme-key-0002").tenant == "acme"
    assert store.current.for_api_key("acme-key-0001") is None
    assert store.reload_if_changed() is False  # and nothing more to do until the next version


def test_keys_added_to_and_removed_from_the_configmap_add_and_remove_tenants(tmp_path):
    volume = ConfigMapVolume(tmp_path / "policies")
    volume.publish({"default.yaml": DEFAULT})
    store = PolicyStore(volume.root, 0)
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0001")})
    assert store.reload_if_changed() and sorted(store.current.tenants) == ["acme", "default"]
    volume.publish({"default.yaml": DEFAULT})
    assert store.reload_if_changed() and sorted(store.current.tenants) == ["default"]


def test_a_bad_configmap_version_keeps_the_last_good_policy(tmp_path):
    volume = ConfigMapVolume(tmp_path / "policies")
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0001")})
    store = PolicyStore(volume.root, 0)
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0001", "extreme")})
    assert store.reload_if_changed()
    assert "acme.yaml" in store.current.errors
    assert store.current.tenants["acme"].strictness == "strict"  # the last good version stays in force


def test_a_running_gateway_follows_its_configmap(make_gateway, guard, upstream):
    gw = make_gateway(DEFAULT, files={"acme.yaml": acme("acme-key-0001")})
    policies = gw.config_path.parent / "policies"
    for f in policies.glob("*.yaml"):  # the same folder, now laid out as a ConfigMap volume
        f.unlink()
    volume = ConfigMapVolume(policies)
    volume.publish({"default.yaml": DEFAULT, "acme.yaml": acme("acme-key-0002")})

    def status(key: str) -> int:
        return httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code

    deadline = time.monotonic() + 10
    while status("acme-key-0002") != 200:
        assert time.monotonic() < deadline, "the gateway did not pick up the ConfigMap's new version"
        time.sleep(0.1)
    assert status("acme-key-0001") == 401
