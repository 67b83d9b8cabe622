"""The hand-made SCTP INIT of kubeproxy.lab.sctp: the kernel drops a packet with a wrong CRC32c
before conntrack/NAT sees it, so the checksum must be right."""

from __future__ import annotations

import struct

from kubeproxy.lab.sctp import crc32c, init_chunk


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value (RFC 3720 B.4)


def test_init_chunk_layout_and_checksum() -> None:
    packet = init_chunk(40001, 8080, 0x1234)
    sport, dport, vtag = struct.unpack("!HHI", packet[:8])
    assert (sport, dport, vtag, len(packet)) == (40001, 8080, 0, 32)
    assert packet[12] == 1 and struct.unpack("!H", packet[14:16])[0] == 20  # INIT, chunk length 20
    (stored,) = struct.unpack("<I", packet[8:12])
    assert stored == crc32c(packet[:8] + b"\0\0\0\0" + packet[12:])
