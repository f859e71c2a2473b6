"""What never reaches disk: secret values from the environment, URI credentials, and the values
of secret-looking names, in argv, declared destinations and params.

A secret can take many forms on its way to a file: as typed, percent-encoded in a URI (as a URI
password must be), JSON-escaped inside a string, base64-encoded inside a header or token. Every
string written by the journal's metadata paths goes through `scrub`, which finds the secrets of
the environment in any of these forms and removes the userinfo (`user:password@`) of any URI.

Names are judged by `is_secret_name` (the rule is documented in the README): they are split into
words, and a name is secret-looking when one word is a credential word (`password`, `secret`,
...), or when its last word is `key` or `token` and the word before does not make it a data
structure's key or a tokenizer's token (`sort_key`, `pad_token`). Plurals and longer words are
not secrets: `max_tokens`, `num_keys`, `tokenizer`, `key_dim`.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import warnings
from typing import Any

REDACTED = "<redacted>"

#: Words that make a name a credential wherever they appear in it.
_CREDENTIAL_WORDS = frozenset({
    "password", "passwd", "passphrase", "secret", "secrets", "credential", "credentials",
    "apikey", "apitoken", "authtoken", "accesstoken", "accesskey", "secretkey", "privatekey",
    "refreshtoken", "sessiontoken", "bearertoken",
})
#: A last word that makes a name a credential, unless the word before is one of `_NOT_SECRET`.
_KEY_WORDS = frozenset({"key", "token"})
#: Words before `key`/`token` that name a data structure's key or a tokenizer's special token.
_NOT_SECRET = frozenset({
    # tokenizers
    "pad", "bos", "eos", "unk", "mask", "sep", "cls", "sos", "start", "end", "begin", "stop",
    "special", "image", "audio", "video", "vision", "text", "prompt", "vocab",
    # keys of data structures, random generators, datasets and checkpoints
    "rng", "prng", "random", "seed", "sort", "primary", "foreign", "partition", "group", "join",
    "cache", "dict", "hash", "lookup", "index", "map", "query", "value", "metric", "monitor",
    "input", "output", "label", "target", "feature", "data", "batch", "column", "field",
    "config", "model", "state", "sample", "dataset", "split",
})
_ENV_SUFFIXES = ("key", "token", "password", "passwd", "secret")
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
#: `scheme://userinfo@`: the userinfo (up to the last '@' of the authority) is removed.
_URI_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")
#: Environment values shorter than this are not searched for in text: too likely to be found
#: in ordinary words. URI userinfo and secret-looking names are removed whatever their length.
MIN_SECRET_LEN = 4
_B64 = "[A-Za-z0-9+/_-]"
_JSON_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f",
                       "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def name_words(name: str) -> list[str]:
    """`WANDB_API_KEY`, `wandbApiKey`, `wandb-api-key` -> ['wandb', 'api', 'key']."""
    return [w.lower() for w in _WORD.findall(name)]


def is_secret_name(name: object) -> bool:
    """Whether a param, option, dict key or environment variable named `name` holds a secret."""
    if not isinstance(name, str):
        return False
    words = name_words(name)
    if not words:
        return False
    if _CREDENTIAL_WORDS.intersection(words):
        return True
    return words[-1] in _KEY_WORDS and (len(words) == 1 or words[-2] not in _NOT_SECRET)


# -- the environment's secrets, in every encoding ----------------------------------------------

#: (raw environment it was computed from, secret values, their pattern)
_cache: tuple[dict | None, frozenset[str], re.Pattern[str] | None] = (None, frozenset(), None)


def _char_forms(c: str) -> str:
    """A regex for one character as typed, percent-encoded (any hex case) or JSON-escaped."""
    forms = [re.escape(c)]
    hexes = [f"{b:02X}" for b in c.encode()]
    forms.append("".join(f"%[{h[0]}{h[0].lower()}][{h[1]}{h[1].lower()}]" for h in hexes))
    if c == " ":
        forms.append(r"\+")
    if c in _JSON_SHORT_ESCAPES:
        forms.append(re.escape(_JSON_SHORT_ESCAPES[c]))
    if ord(c) < 0x10000:  # beyond, JSON writes a surrogate pair
        forms.append(r"\\u(?i:" + f"{ord(c):04x}" + ")")
    return "(?:" + "|".join(forms) + ")"


def _base64_cores(secret: bytes) -> set[str]:
    """The base64 characters that depend only on `secret`, for each of its three alignments in
    a longer encoded string (standard and URL-safe alphabets)."""
    cores = set()
    for align in range(3):
        enc = base64.b64encode(b"\0" * align + secret).decode()
        first = -(-8 * align // 6)
        last = 8 * (align + len(secret)) // 6
        core = enc[first:last]
        if len(core) >= 6:
            cores.add(core)
            cores.add(core.translate(str.maketrans("+/", "-_")))
    return cores


def _secret_pattern(secrets: frozenset[str]) -> re.Pattern[str] | None:
    alternatives = []
    for s in sorted(secrets, key=len, reverse=True):
        raw = s.encode()
        alternatives.append("".join(_char_forms(c) for c in s))
        # the whole base64 word around a core: its edge characters hold bits of the secret
        alternatives.extend(f"{_B64}*{re.escape(core)}{_B64}*=*" for core in _base64_cores(raw))
        alternatives.extend((raw.hex(), raw.hex().upper()))
    return re.compile("|".join(alternatives)) if alternatives else None


def _environment_secrets() -> re.Pattern[str] | None:
    """One regex matching every secret-looking environment value in any of its encodings.
    Recomputed only when the environment changed: decoding os.environ costs about 1 µs a
    variable, so its raw bytes (CPython's `os.environ._data`) are compared with the last ones."""
    global _cache
    raw = getattr(os.environ, "_data", None)
    if raw is not None and raw == _cache[0]:
        return _cache[2]
    secrets = frozenset(v for k, v in os.environ.items()
                        if len(v) >= MIN_SECRET_LEN and _is_secret_env(k))
    pattern = _cache[2] if secrets == _cache[1] else _secret_pattern(secrets)
    _cache = (dict(raw) if raw is not None else None, secrets, pattern)
    return pattern


@functools.lru_cache(maxsize=4096)
def _is_secret_env(name: str) -> bool:
    """Environment names are also secret when their last word ends like one (`GITHUBTOKEN`,
    `MYKEY`): variables are named in capitals, often without separators."""
    words = name_words(name)
    return is_secret_name(name) or bool(words) and words[-1].endswith(_ENV_SUFFIXES)


def _scrub(text: str, secrets: re.Pattern[str] | None) -> str:
    out = _URI_USERINFO.sub(r"\1", text)
    if secrets is not None:
        out = secrets.sub(REDACTED, out)
    return text if out == text else out


def scrub(text: str) -> str:
    """`text` without URI userinfo and without any environment secret, in any encoding."""
    return _scrub(text, _environment_secrets())


def redact(obj: Any) -> Any:
    """`obj` (JSON-like) with its strings scrubbed and the values of secret-looking keys
    replaced (None and booleans are kept: they say whether something was set, not what).
    Returns `obj` itself when nothing had to change."""
    return _redact(obj, _environment_secrets())


def _redact(obj: Any, secrets: re.Pattern[str] | None) -> Any:
    """`obj` itself when nothing in it must change, else a redacted copy. A container that
    holds itself (a self-referencing list) is looked at once, and its copy holds the copy,
    never the original: it has the same shape (`[...]` in its repr) and no secret."""
    if not _holds_secret(obj, secrets, set()):
        return obj
    return _copy(obj, secrets, {})


def _holds_secret(obj: Any, secrets: re.Pattern[str] | None, seen: set[int]) -> bool:
    if isinstance(obj, str):
        return _scrub(obj, secrets) is not obj
    if not isinstance(obj, (dict, list, tuple)) or id(obj) in seen:
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        return any(_hidden(v, secrets, seen) if is_secret_name(k)
                   else _holds_secret(v, secrets, seen) for k, v in obj.items())
    return any(_holds_secret(v, secrets, seen) for v in obj)


def _hidden(value: Any, secrets: re.Pattern[str] | None, seen: set[int]) -> bool:
    """Whether `_hide` changes `value`."""
    if value is None or isinstance(value, bool):
        return False
    return not isinstance(value, dict) or _holds_secret(value, secrets, seen)


def _copy(obj: Any, secrets: re.Pattern[str] | None, memo: dict[int, Any]) -> Any:
    """A redacted copy of `obj` (tuples become lists, as JSON has them); `memo` maps each
    container copied so far to its copy."""
    if isinstance(obj, str):
        return _scrub(obj, secrets)
    if not isinstance(obj, (dict, list, tuple)):
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        out: Any = memo.setdefault(id(obj), {})
        for k, v in obj.items():
            out[k] = _hide(v, secrets, memo) if is_secret_name(k) else _copy(v, secrets, memo)
        return out
    out = memo.setdefault(id(obj), [])
    out.extend(_copy(v, secrets, memo) for v in obj)
    return out


def _hide(value: Any, secrets: re.Pattern[str] | None, memo: dict[int, Any] | None = None
          ) -> Any:
    """The value of a secret-looking name: a dict is searched further, anything else but None
    and booleans is replaced."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict):
        return _redact(value, secrets) if memo is None else _copy(value, secrets, memo)
    return REDACTED


def redact_argv(argv: list[str]) -> list[str]:
    """Hide the values of secret-looking options (`--api-key X`, `--token=X`) and scrub every
    argument."""
    secrets = _environment_secrets()
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        option = arg.split("=", 1)[0]
        if arg.startswith("-") and is_secret_name(option):
            if "=" in arg:
                out.append(option + "=" + REDACTED)
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(_scrub(arg, secrets))
    return out


_warned_params: set[str] = set()


def redact_param(name: str, value: Any) -> Any:
    """A param's value as it may be journaled: hidden under a secret-looking name, else
    scrubbed (a dict's secret-looking keys hidden). Warns once per name when anything was
    removed, so that a user who sees `<redacted>` in a tracker knows why. A value nested
    deeper than the recursion limit cannot be searched: it is journaled as its type only."""
    secrets = _environment_secrets()
    try:
        out = _hide(value, secrets) if is_secret_name(name) else _redact(value, secrets)
        why, instead = ("holds a secret (a secret-looking name, a URI password or an environment "
                        "secret)", REDACTED)
    except RecursionError:
        out = instead = f"<{type(value).__name__} nested too deeply to be searched for secrets>"
        why = "is nested too deeply to be searched for secrets"
    if out is not value and name not in _warned_params:
        _warned_params.add(name)
        warnings.warn(f"itwinai-journal: param {name!r} {why}; it is journaled with {instead!r} "
                      "in its place", RuntimeWarning, stacklevel=4)
    return out
