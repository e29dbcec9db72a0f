"""Key placement as pymemcache's ``HashClient`` (Celery's client for several servers) does it.

Rendezvous hashing: a key goes to the node with the highest
``murmur3_32("<node>-<key>", seed=0)``, ties going to the greatest node name,
where a node is named ``"host:port"`` (or its socket path). pymemcache's
murmur3 reads a string's characters, keeping the low byte of each
(``ord(c) & 0xFF``): ASCII text hashes as its bytes. With one server there is
no hashing, as in Celery.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["hash_input", "murmur3_32", "rendezvous_node"]


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 (x86, 32 bits) of ``data``."""
    c1, c2, mask = 0xCC9E2D51, 0x1B873593, 0xFFFFFFFF
    length = len(data)
    h1 = seed
    blocks = length // 4
    for k1 in struct.unpack_from(f"<{blocks}I", data):
        k1 = (k1 * c1) & mask
        k1 = ((k1 << 15) | (k1 >> 17)) & mask
        k1 = (k1 * c2) & mask
        h1 ^= k1
        h1 = ((h1 << 13) | (h1 >> 19)) & mask
        h1 = (h1 * 5 + 0xE6546B64) & mask
    tail = data[blocks * 4 :]
    if tail:
        k1 = int.from_bytes(tail, "little")
        k1 = (k1 * c1) & mask
        k1 = ((k1 << 15) | (k1 >> 17)) & mask
        k1 = (k1 * c2) & mask
        h1 ^= k1
    h1 ^= length
    h1 ^= h1 >> 16
    h1 = (h1 * 0x85EBCA6B) & mask
    h1 ^= h1 >> 13
    h1 = (h1 * 0xC2B2AE35) & mask
    h1 ^= h1 >> 16
    return h1


def hash_input(text: str) -> bytes:
    """What pymemcache's murmur3 reads of a string: the low byte of each character
    (it hashes ``ord(c) & 0xFF``), so ASCII text hashes as its bytes."""
    if text.isascii():
        return text.encode()
    return text.encode("utf-32-le", "surrogatepass")[::4]


def rendezvous_node(names: Sequence[str], key: str) -> int:
    """The index in ``names`` of the node pymemcache's ``RendezvousHash`` picks for ``key``."""
    best, winner = -1, -1
    for index, name in enumerate(names):
        score = murmur3_32(hash_input(f"{name}-{key}"))
        if score > best or (score == best and name > names[winner]):
            best, winner = score, index
    return winner
