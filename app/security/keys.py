"""The syntax of an API key entry: an item of `CAPTIONER_API_KEYS` or a line of `CAPTIONER_API_KEYS_FILE`.

An entry is a key (or its SHA-256) followed by optional options, separated by spaces or tabs:

    <key>                      a plain key: 16-256 visible ASCII characters, not starting with `sha256:`
    sha256:<64 hex digits>     the SHA-256 of a key's UTF-8 bytes, in hex (either case): the service
                               then never holds the key itself (`printf %s "$KEY" | sha256sum`)
    <key or hash> rate=<n>     this key's rate limit, n requests per minute (1-1000000), instead of
                               CAPTIONER_API_KEY_RATE_LIMIT
    <key or hash> rate=off     no rate limit for this key, whatever CAPTIONER_API_KEY_RATE_LIMIT says
    <key or hash> burst=<n>    this key's bucket size (1-1000000): how many requests it may send at once;
                               unset: CAPTIONER_API_KEY_RATE_BURST, else its rate

In the file, blank lines and lines starting with `#` are skipped. A key never contains a space, so
the first word of an entry is always the key. Error messages never quote an entry (it may be a key):
they name its position and what is wrong.

No imports from the rest of the service: app/settings.py validates entries with these rules at
start-up and app/api/auth.py parses them again whenever the keys file changes.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

MIN_API_KEY_LENGTH = 16
MAX_API_KEY_LENGTH = 256
HASH_PREFIX = "sha256:"
MAX_RATE = 1_000_000  # per minute; also the largest burst
_HEX64 = re.compile(r"[0-9A-Fa-f]{64}")
_DIGITS = re.compile(r"[0-9]{1,7}")
_OPTION_HINT = f"rate=<1-{MAX_RATE}|off> or burst=<1-{MAX_RATE}> (a key holds no spaces)"


@dataclass(frozen=True)
class KeyEntry:
    """One parsed entry. `digest`: the SHA-256 of the key. `rate`: requests per minute, 0 for `rate=off`,
    None when the entry does not say. `burst`: None when the entry does not say."""

    digest: bytes
    rate: int | None = None
    burst: int | None = None


def key_digest(key: str | bytes) -> bytes:
    """The SHA-256 of a key (what every comparison and every rate-limit bucket uses)."""
    return hashlib.sha256(key.encode("utf-8") if isinstance(key, str) else key).digest()


def _key_problem(key: str) -> str | None:
    if key.lower().startswith(HASH_PREFIX):
        hexdigits = key[len(HASH_PREFIX):]
        if not _HEX64.fullmatch(hexdigits):
            return (f"starts with '{HASH_PREFIX}' but is not followed by 64 hexadecimal digits "
                    f"(it has {len(hexdigits)} characters after the prefix)")
        return None
    if not MIN_API_KEY_LENGTH <= len(key) <= MAX_API_KEY_LENGTH:
        return f"must be {MIN_API_KEY_LENGTH} to {MAX_API_KEY_LENGTH} characters long (it has {len(key)})"
    if not all("!" <= ch <= "~" for ch in key):
        return "may hold only visible ASCII characters (no spaces)"
    return None


def _number(value: str) -> int | None:
    if not _DIGITS.fullmatch(value):
        return None
    number = int(value)
    return number if 1 <= number <= MAX_RATE else None


def parse_entry(text: str) -> KeyEntry:
    """Parse one entry; ValueError (a message that never quotes the entry) if it is invalid."""
    words = text.split()
    if not words:
        raise ValueError("is empty")
    key, options = words[0], words[1:]
    problem = _key_problem(key)
    if problem:
        raise ValueError(problem)
    seen: dict[str, int] = {}
    for option in options:
        name, sep, value = option.partition("=")
        name = name.lower()
        if not sep or name not in ("rate", "burst"):
            raise ValueError(f"has an option that is not {_OPTION_HINT}")
        if name in seen:
            raise ValueError(f"gives {name}= twice")
        number = 0 if name == "rate" and value.lower() == "off" else _number(value)
        if number is None:
            raise ValueError(f"has an invalid {name}= value: it must be "
                             + (f"1 to {MAX_RATE} requests per minute, or off" if name == "rate" else f"1 to {MAX_RATE}"))
        seen[name] = number
    if key.lower().startswith(HASH_PREFIX):
        digest = bytes.fromhex(key[len(HASH_PREFIX):])
    else:
        digest = key_digest(key)
    return KeyEntry(digest, seen.get("rate"), seen.get("burst"))


def entry_problem(text: str) -> str | None:
    """Why `text` is not a valid entry (None if it is). Never quotes the entry."""
    try:
        parse_entry(text)
    except ValueError as exc:
        return str(exc)
    return None


def read_keys_file(path: Path) -> list[str]:
    """The entries of an API keys file, each checked (ValueError naming the line, never its text)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"cannot read the API keys file: {reason}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        problem = entry_problem(entry)
        if problem:
            raise ValueError(f"the key on line {number} of the API keys file {problem}")
        entries.append(entry)
    if not entries:
        raise ValueError("the API keys file holds no key")
    return entries
