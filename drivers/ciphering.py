"""DLMS security suite 0 for the client: AES-GCM-128 on APDUs, and the HLS-GMAC challenge answers.

This is the head-end's one place that ciphers. It uses the `cryptography` package (OpenSSL):
gurux-dlms ciphers in pure Python (GXDLMSChipperingStream), about 1,400 small APDUs per second
against some 300,000 here, which would make the cipher the largest cost of a read.

Green Book facts used (DLMS UA 1000-2, security suite 0):
- security control byte (SC): bit 4 authentication, bit 5 encryption, low nibble the suite
  (0); the head-end always sends 0x30, authenticated and encrypted, and accepts only 0x30 back.
- IV = system title of the sender (8 octets) || invocation counter (4 octets, big-endian).
- authenticated encryption: additional data = SC || authentication key; the tag is truncated
  to 12 octets; ciphered content = SC || IC || ciphertext || tag.
- HLS mechanism 5 (GMAC): f(challenge) = SC 0x10 || IC || GMAC over SC || AK || challenge,
  12 octets, with the sender's system title and a fresh IC.
- glo-service APDUs (one tag per service: glo-get-request 0xC8 ...) carry the ciphered content
  as an octet string; general-glo-ciphering (0xDB) also carries the sender's system title.

`cryptography`'s AESGCM checks only full 16-octet tags, and its Cipher/GCM decryptor, which
checks 12, costs six times as much per APDU. `GlobalCipher.open` therefore recomputes the tag:
GCM's keystream is the encryption of zeros under the same IV, so the plaintext is ciphertext
XOR keystream, and encrypting that plaintext again must give the same ciphertext and a tag
whose first 12 octets match (compared in constant time). Nothing is returned before that check.

Keys live in `SecurityKeys`, whose repr and str never show them, so no log line, error or
traceback can carry a key. Errors raised here (`CipheringError`) say what failed, never with what.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SUITE_0 = 0x00
AUTHENTICATED = 0x10
AUTHENTICATED_ENCRYPTED = 0x30
TAG_SIZE = 12
SYSTEM_TITLE_SIZE = 8
KEY_SIZE = 16
_COUNTER = struct.Struct(">I")
MAX_COUNTER = 0xFFFFFFFF

# Plain xDLMS APDU tag -> its glo-ciphered tag (Green Book, xDLMS APDUs with global ciphering).
GLO_TAGS: dict[int, int] = {
    0x01: 0x21,  # initiate-request -> glo-initiate-request
    0x08: 0x28,  # initiate-response -> glo-initiate-response
    0xC0: 0xC8,  # get-request -> glo-get-request
    0xC1: 0xC9,  # set-request -> glo-set-request
    0xC3: 0xCB,  # action-request -> glo-action-request
    0xC4: 0xCC,  # get-response -> glo-get-response
    0xC5: 0xCD,  # set-response -> glo-set-response
    0xC7: 0xCF,  # action-response -> glo-action-response
}
PLAIN_TAGS = {glo: plain for plain, glo in GLO_TAGS.items()}
GENERAL_GLO_CIPHERING = 0xDB


class CipheringError(ValueError):
    """A ciphered APDU did not authenticate, or is not one; the text names no key."""


@dataclass(frozen=True, repr=False)
class SecurityKeys:
    """A meter's global unicast encryption key and authentication key (16 octets each)."""

    encryption_key: bytes
    authentication_key: bytes

    def __post_init__(self) -> None:
        for name in ("encryption_key", "authentication_key"):
            if len(getattr(self, name)) != KEY_SIZE:
                raise ValueError(f"{name} must be {KEY_SIZE} octets")

    def __repr__(self) -> str:
        return "SecurityKeys(<hidden>)"

    __str__ = __repr__


def check_system_title(system_title: bytes, whose: str) -> bytes:
    if len(system_title) != SYSTEM_TITLE_SIZE:
        raise ValueError(f"{whose} system title must be {SYSTEM_TITLE_SIZE} octets, "
                         f"got {len(system_title)}")
    return bytes(system_title)


class GlobalCipher:
    """AES-GCM-128 with one key pair (security suite 0)."""

    __slots__ = ("_aead", "_authentication_key")

    def __init__(self, keys: SecurityKeys) -> None:
        self._aead = AESGCM(keys.encryption_key)
        self._authentication_key = keys.authentication_key

    def __repr__(self) -> str:
        return "GlobalCipher(<keys hidden>)"

    def seal(self, system_title: bytes, counter: int, plaintext: bytes) -> bytes:
        """Ciphered content SC || IC || ciphertext || tag, authenticated and encrypted."""
        iv = system_title + _COUNTER.pack(counter)
        sealed = self._aead.encrypt(iv, plaintext, bytes((AUTHENTICATED_ENCRYPTED,))
                                    + self._authentication_key)
        return bytes((AUTHENTICATED_ENCRYPTED,)) + iv[8:] + sealed[:-16] + sealed[-16:-4]

    def open(self, system_title: bytes, content: bytes) -> tuple[int, bytes]:
        """(IC, plaintext) of ciphered content made by the holder of `system_title`."""
        if len(content) < 5 + TAG_SIZE:
            raise CipheringError(f"ciphered content of {len(content)} octets is too short")
        control = content[0]
        if control != AUTHENTICATED_ENCRYPTED:
            raise CipheringError(f"security control 0x{control:02x}, expected 0x30 "
                                 "(authenticated and encrypted, suite 0)")
        counter = _COUNTER.unpack_from(content, 1)[0]
        ciphertext, tag = content[5:-TAG_SIZE], content[-TAG_SIZE:]
        iv = system_title + content[1:5]
        size = len(ciphertext)
        keystream = self._aead.encrypt(iv, bytes(size), b"")[:size]
        plaintext = (int.from_bytes(ciphertext, "big") ^ int.from_bytes(keystream, "big")
                     ).to_bytes(size, "big")
        again = self._aead.encrypt(iv, plaintext, bytes((control,)) + self._authentication_key)
        if not hmac.compare_digest(again[size:size + TAG_SIZE], tag):
            raise CipheringError("authentication tag does not match (wrong key or system "
                                 "title, or the APDU was altered)")
        return counter, plaintext

    def gmac(self, system_title: bytes, counter: int, challenge: bytes) -> bytes:
        """HLS-GMAC f(challenge): SC 0x10 || IC || GMAC(SC || AK || challenge), 17 octets."""
        iv = system_title + _COUNTER.pack(counter)
        tag = self._aead.encrypt(iv, b"", bytes((AUTHENTICATED,)) + self._authentication_key
                                 + challenge)
        return bytes((AUTHENTICATED,)) + iv[8:] + tag[:TAG_SIZE]

    def check_gmac(self, system_title: bytes, answer: bytes, challenge: bytes) -> int:
        """The IC of a correct f(challenge) made by `system_title`; CipheringError if wrong."""
        if len(answer) != 5 + TAG_SIZE or answer[0] != AUTHENTICATED:
            raise CipheringError("HLS-GMAC answer is not SC 0x10 || IC || 12-octet tag")
        counter = _COUNTER.unpack_from(answer, 1)[0]
        if not hmac.compare_digest(self.gmac(system_title, counter, challenge), answer):
            raise CipheringError("HLS-GMAC answer to the challenge does not match")
        return counter


def glo_apdu(plain_tag: int, content: bytes) -> bytes:
    """The glo-service APDU carrying `content` (ciphered content of a `plain_tag` APDU)."""
    return bytes((GLO_TAGS[plain_tag],)) + ber_length(len(content)) + content


def general_glo_apdu(system_title: bytes, content: bytes) -> bytes:
    """general-glo-ciphering: system-title and ciphered-content, both octet strings."""
    return (bytes((GENERAL_GLO_CIPHERING, len(system_title))) + system_title
            + ber_length(len(content)) + content)


def split_ciphered(apdu: bytes) -> tuple[int, bytes | None, bytes]:
    """(APDU tag, system title carried or None, ciphered content) of a ciphered APDU."""
    tag = apdu[0]
    position = 1
    title = None
    if tag == GENERAL_GLO_CIPHERING:
        size, position = read_ber_length(apdu, position)
        title = apdu[position:position + size]
        position += size
    elif tag not in PLAIN_TAGS:
        raise CipheringError(f"APDU tag 0x{tag:02x} is not a globally ciphered APDU")
    size, position = read_ber_length(apdu, position)
    if position + size != len(apdu):
        raise CipheringError(f"ciphered APDU 0x{tag:02x} says {size} octets, "
                             f"carries {len(apdu) - position}")
    return tag, title, apdu[position:]


def ber_length(size: int) -> bytes:
    if size < 0x80:
        return bytes((size,))
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def read_ber_length(data: bytes, position: int) -> tuple[int, int]:
    if position >= len(data):
        raise CipheringError(f"length missing at offset {position}")
    first = data[position]
    if first < 0x80:
        return first, position + 1
    count = first & 0x7F
    if not 1 <= count <= 4 or position + 1 + count > len(data):
        raise CipheringError(f"bad length 0x{first:02x} at offset {position}")
    return (int.from_bytes(data[position + 1:position + 1 + count], "big"),
            position + 1 + count)


class ReplayedCounter(CipheringError):
    """The sender's invocation counter is not larger than the last one accepted from it."""

    def __init__(self, counter: int, last_seen: int) -> None:
        super().__init__(f"invocation counter {counter} is not larger than {last_seen}, "
                         "the last one seen from this sender")
        self.counter = counter
        self.last_seen = last_seen


class CountersExhausted(CipheringError):
    """The invocation counters reserved for this session are all used."""


@dataclass(frozen=True, repr=False)
class HlsGmac:
    """What one HLS-GMAC association (mechanism 5, suite 0) needs: the meter's keys, both
    system titles, the block of client invocation counters reserved for this session
    [first_counter, counter_limit), and the last counter seen from the meter (-1: none)."""

    keys: SecurityKeys
    client_system_title: bytes
    server_system_title: bytes
    first_counter: int
    counter_limit: int
    last_server_counter: int = -1

    def __post_init__(self) -> None:
        check_system_title(self.client_system_title, "client")
        check_system_title(self.server_system_title, "meter")
        if not 0 <= self.first_counter < self.counter_limit <= MAX_COUNTER + 1:
            raise ValueError(f"invocation counter block [{self.first_counter}, "
                             f"{self.counter_limit}) is empty or out of range")

    def __repr__(self) -> str:
        return (f"HlsGmac(client_system_title={self.client_system_title.hex()}, "
                f"server_system_title={self.server_system_title.hex()}, "
                f"counters=[{self.first_counter}, {self.counter_limit}), keys=<hidden>)")


class CipheredChannel:
    """Both directions of one ciphered association: the client's counters go up one per
    ciphered APDU or GMAC, within the reserved block; every counter from the meter must be
    larger than the last one seen from it."""

    def __init__(self, settings: HlsGmac) -> None:
        self.settings = settings
        self._cipher = GlobalCipher(settings.keys)
        self._own_title = settings.client_system_title
        self._peer_title = settings.server_system_title
        self.next_counter = settings.first_counter
        self.last_peer_counter = settings.last_server_counter

    def __repr__(self) -> str:
        return f"CipheredChannel({self.settings!r})"

    def take_counter(self) -> int:
        counter = self.next_counter
        if counter >= self.settings.counter_limit:
            raise CountersExhausted(
                f"the {self.settings.counter_limit - self.settings.first_counter} invocation "
                "counters reserved for this session are used up")
        self.next_counter = counter + 1
        return counter

    def protect(self, apdu: bytes) -> bytes:
        """The glo-service APDU for a plain xDLMS APDU."""
        return glo_apdu(apdu[0], self._cipher.seal(self._own_title, self.take_counter(), apdu))

    def unprotect(self, apdu: bytes) -> bytes:
        """The plain APDU inside a glo-service or general-glo-ciphering APDU from the meter."""
        tag, title, content = split_ciphered(apdu)
        if title is not None and title != self._peer_title:
            raise CipheringError(f"general-glo-ciphering from system title {title.hex()}, "
                                 f"the meter's is {self._peer_title.hex()}")
        counter, plain = self._cipher.open(self._peer_title, content)
        self._accept_counter(counter)
        if tag != GENERAL_GLO_CIPHERING and (not plain or PLAIN_TAGS[tag] != plain[0]):
            raise CipheringError(f"glo APDU 0x{tag:02x} carries APDU 0x{plain[:1].hex()}")
        return plain

    def challenge_answer(self, challenge: bytes) -> bytes:
        """f(StoC) for HLS pass 3."""
        return self._cipher.gmac(self._own_title, self.take_counter(), challenge)

    def check_challenge_answer(self, answer: bytes, challenge: bytes) -> None:
        """Check the meter's f(CtoS) of HLS pass 4. Its counter is not checked for replay on
        its own: it travels inside the ciphered action-response, whose counter was."""
        self._cipher.check_gmac(self._peer_title, answer, challenge)

    def _accept_counter(self, counter: int) -> None:
        if counter <= self.last_peer_counter:
            raise ReplayedCounter(counter, self.last_peer_counter)
        self.last_peer_counter = counter
