"""NATS KV keys: Celery's key names, split into subject tokens that cannot escape.

A KV key is a NATS subject: ``.`` separates tokens, ``*`` and ``>`` are
wildcards, and only ``[-/_=.A-Za-z0-9]`` may appear. A record's key is two
tokens, the kind and the id: ``celery-task-meta-.<id>`` (with
``global_keyprefix`` in the first token), so one watch on
``celery-task-meta-.*`` sees every task record and nothing else.

Each token is its text when that is only letters, digits, ``-`` and ``_``
(uuids, most ids), else ``=`` followed by its UTF-8 bytes in unpadded
base64url: an id holding ``.``, ``*``, ``>``, a space or a non-ASCII letter is
one token, never a wildcard or a second token, and no two texts share a token
(a plain token never starts with ``=``).
"""

from __future__ import annotations

import base64
import re

__all__ = ["decode_token", "token"]

_PLAIN = re.compile(r"[A-Za-z0-9_-]+")


def token(text: str) -> str:
    """The subject token that stands for ``text`` (see the module docstring)."""
    if _PLAIN.fullmatch(text):
        return text
    return "=" + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_token(value: str) -> str:
    """The text a :func:`token` stands for.

    :raises ValueError: not a token this module made.
    """
    if not value.startswith("="):
        if not _PLAIN.fullmatch(value):
            raise ValueError(f"not a key token: {value!r}")
        return value
    data = value[1:]
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode()
