"""Where policies come from: `policies_dir/default.yaml` plus one file per tenant, reloaded while running.

Policy files end in `.yaml` or `.yml` (read alike). Each tenant file overrides the defaults (nested mappings
merge key by key). Tenants are found by the gateway API key the client sends. Files that fail validation at
start stop the gateway, all of them listed; one that fails later is reported and its last good version
stays in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gateway.policy.schema import Policy
from gateway.yamlfile import ConfigError, load_model, read_mapping

log = logging.getLogger("guardgate.policy")

DEFAULT_FILE = "default.yaml"
DEFAULT_FILE_YML = "default.yml"
SUFFIXES = (".yaml", ".yml")  # a policy file is either; any other file in the folder is ignored


def key_digest(key: str) -> bytes:
    """The SHA-256 of a key as written in a policy file (plain, or already `sha256:<hex>`)."""
    if key.startswith("sha256:"):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: a tenant's nested mappings (prompt, response, categories) override key by key."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass(frozen=True)
class PolicySet:
    """One consistent view of all policies; requests read it once, reloads swap it whole."""

    default: Policy
    tenants: dict[str, Policy]  # by tenant name, "default" included
    key_index: dict[bytes, str]  # sha256(key) → tenant name
    errors: dict[str, str] = field(default_factory=dict)  # file name → why it is not (or no longer) in force
    files: dict[str, str] = field(default_factory=dict)  # file name → the tenant it defines

    @property
    def open(self) -> bool:
        """No keys anywhere: every request gets the default policy."""
        return not self.key_index

    def for_api_key(self, key: str | None) -> Policy | None:
        """The policy of the tenant holding `key`; None when keys exist and this one is not among them."""
        if self.open:
            return self.default
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, name in self.key_index.items():  # every key compared, no early exit: constant time
            if hmac.compare_digest(stored, digest):
                found = name
        return self.tenants[found] if found is not None else None


@dataclass
class _Loaded:
    data: dict[str, Any]
    lines: dict[tuple, int]


class PolicyStore:
    """The policy files, read at start and re-read when they change; every reload fails safe: a file that
    does not validate keeps its last good version, and a reload that would leave a gateway that had keys
    with none (open to everyone) is refused whole."""

    def __init__(self, policies_dir: Path, reload_interval_s: float = 1.0, *, strict: bool = True,
                 allow_open: bool = True) -> None:
        """strict: any invalid file raises ConfigError (at start). Otherwise invalid files are left out
        and listed in `current.errors` (for `guardgate policy validate`). allow_open: whether a folder
        without any api_keys may serve everyone with the default policy."""
        self.dir = policies_dir
        self.reload_interval_s = reload_interval_s
        if not self.dir.is_dir():
            raise ConfigError(f"policies_dir: {self.dir} is not a folder")
        self._good: dict[str, _Loaded] = {}  # file name → last version that validated
        self._signatures: dict[str, tuple[int, int, int]] = {}
        self.current = self._build(strict=strict)
        if self.current.open and not allow_open:
            raise ConfigError(f"{self.dir}: no policy file has api_keys, so every client would be served with "
                              "the default policy; add keys, or set server.allow_open: true to run open")

    # ----- loading -----

    def _files(self) -> dict[str, tuple[int, int, int]]:
        # stat() follows symlinks: a Kubernetes ConfigMap volume shows each key as `name -> ..data/name` and
        # publishes a version by swapping `..data` to a folder of new files. The inode tells those apart even
        # when size and mtime match (same length, written within one tick of the filesystem clock).
        out = {}
        for path in sorted(p for p in self.dir.iterdir() if p.suffix in SUFFIXES and not p.name.startswith(".")):
            try:
                st = path.stat()
            except OSError:
                continue  # removed between glob and stat
            out[path.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return out


    def _build(self, strict: bool) -> PolicySet:
        """Read every file. strict (at start): any error raises. Otherwise keep each file's last good version."""
        files = self._files()
        self._signatures = files
        errors: dict[str, str] = {}

        def attempt(name: str, validate) -> Any:
            try:
                loaded = _Loaded(*read_mapping(self.dir / name))
                result = validate(loaded)
                self._good[name] = loaded
                return result
            except Exception as e:  # one bad file never stops the others from loading
                errors[name] = str(e) if isinstance(e, ConfigError) else f"{self.dir / name}: {type(e).__name__}: {e}"
                previous = self._good.get(name)
                return validate(previous) if previous is not None and not strict else None

        # default.yml is the default file too; both at once is ambiguous, and the .yaml one is used.
        defaults = [n for n in (DEFAULT_FILE, DEFAULT_FILE_YML) if n in files]
        if len(defaults) == 2:
            errors[DEFAULT_FILE_YML] = (f"{self.dir / DEFAULT_FILE_YML}: both {DEFAULT_FILE} and {DEFAULT_FILE_YML} "
                                        f"exist; keep one (the default policy is read from {DEFAULT_FILE})")
        default_name = defaults[0] if defaults else DEFAULT_FILE
        default_path = self.dir / default_name

        def validate_default(loaded: _Loaded) -> Policy:
            if loaded.data.get("tenant", "default") != "default":
                raise ConfigError(f"{default_path}: tenant: the default policy's tenant must be 'default'")
            return load_model(Policy, default_path, loaded.data, loaded.lines)

        if default_name in files:
            default = attempt(default_name, validate_default) or Policy()
        else:
            # Built-in defaults: moderate (40), block both stages, fail closed.
            self._good.pop(default_name, None)
            default = Policy()
        default_data = (self._good[default_name].data if default_name in self._good else {})
        inherited = {k: v for k, v in default_data.items() if k not in ("tenant", "api_keys")}

        tenants: dict[str, Policy] = {"default": default}
        sources = {default_name: "default"} if default_name in files else {}
        key_index: dict[bytes, str] = {key_digest(k): "default" for k in default.api_keys}
        for name in files:
            if name in (DEFAULT_FILE, DEFAULT_FILE_YML):
                continue
            path = self.dir / name

            def validate_tenant(loaded: _Loaded, path: Path = path) -> Policy:
                tenant = loaded.data.get("tenant")
                if not isinstance(tenant, str) or not tenant or tenant == "default":
                    line = loaded.lines.get(("tenant",))
                    where = f"{path}:{line}" if line else str(path)
                    raise ConfigError(f"{where}: tenant: each tenant file needs `tenant: <name>` "
                                      "(a name other than 'default')")
                policy = load_model(Policy, path, merge(inherited, loaded.data), loaded.lines)
                previous = self._good.get(path.name)
                if not policy.api_keys and previous is not None and previous.data.get("api_keys"):
                    raise ConfigError(f"{path}: api_keys: this tenant had keys and now has none; its clients "
                                      "would fall to other policies. To retire the tenant, delete the file")
                if policy.tenant in tenants:
                    raise ConfigError(f"{path}: tenant: '{policy.tenant}' is already defined by another file")
                for key in policy.api_keys:
                    owner = key_index.get(key_digest(key))
                    if owner is not None:
                        raise ConfigError(f"{path}: api_keys: a key of this file is already used by tenant "
                                          f"'{owner}'")
                return policy

            policy = attempt(name, validate_tenant)
            if policy is None:
                continue
            tenants[policy.tenant] = policy
            sources[name] = policy.tenant
            for key in policy.api_keys:
                key_index[key_digest(key)] = policy.tenant
        for gone in set(self._good) - set(files):
            del self._good[gone]
        if strict and errors:  # at start: every broken file at once, not only the first
            raise ConfigError("\n".join(errors[name] for name in sorted(errors)))
        return PolicySet(default=default, tenants=tenants, key_index=key_index, errors=errors, files=sources)

    # ----- hot reload -----

    def reload_if_changed(self) -> bool:
        """Rebuild when any policy file was added, removed or changed. True if a new set is in force."""
        if self._files() == self._signatures:
            return False
        previous_errors = self.current.errors
        candidate = self._build(strict=False)
        if candidate.open and not self.current.open:
            message = ("refused: after this change no policy file has api_keys, which would open the gateway "
                       "to every client; the last good policies stay in force (restart with "
                       "server.allow_open: true to run open)")
            candidate = replace(self.current, errors={**candidate.errors, "*": message})
        self.current = candidate
        for name, message in self.current.errors.items():
            if previous_errors.get(name) != message:
                log.error("policy file rejected; its last good version stays in force",
                          extra={"fields": {"event": "policy_error", "file": name, "error": message}})
        log.info("policies reloaded", extra={"fields": {
            "event": "policy_reload", "tenants": sorted(self.current.tenants), "errors": sorted(self.current.errors)}})
        return True

    async def watch(self) -> None:
        """Poll the folder; cheap (one stat per file) and works on every filesystem and mount."""
        while True:
            await asyncio.sleep(self.reload_interval_s)
            try:
                # Off the event loop: reading and validating files must never stall requests.
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:  # never let the watcher die: the last good set stays in force
                log.exception("policy reload failed", extra={"fields": {"event": "policy_error"}})
