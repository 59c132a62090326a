"""``backupd serve``'s inputs that never reach qemu unchecked: the PSK key file and the
``--listen`` address (IPv6 in brackets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backupd.commands.serve import _listen
from backupd.errors import UsageError
from backupd.serving import load_psk_file

KEY = "ab" * 32


def test_psk_file_is_checked_and_normalised(tmp_path: Path) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_bytes(f"alice:{KEY}\r\n\r\n  bob:{KEY.upper()}  \n".encode())
    assert load_psk_file(keys) == f"alice:{KEY}\nbob:{KEY.upper()}\n".encode()


@pytest.mark.parametrize(
    "content",
    [f"alice {KEY}\n", f":{KEY}\n", "alice:\n", "alice:xyz\n", f"alice:{KEY}\nbob:abc\n"],
)
def test_bad_psk_lines(tmp_path: Path, content: str) -> None:
    keys = tmp_path / "keys.psk"
    keys.write_text(content)
    with pytest.raises(UsageError, match="not USERNAME:HEXKEY") as info:
        load_psk_file(keys)
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:10809", ("127.0.0.1", 10809)),
        ("[::1]:10810", ("::1", 10810)),
        ("[2001:db8::10]:1", ("2001:db8::10", 1)),
        ("backup.example:10809", ("backup.example", 10809)),
    ],
)
def test_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert _listen(text) == address


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("::1:10809", "brackets"),
        ("10809", "HOST:PORT"),
        ("host:", "HOST:PORT"),
        ("host:70000", "HOST:PORT"),
        ("[]:10809", "HOST:PORT"),
    ],
)
def test_bad_listen_addresses(text: str, error: str) -> None:
    with pytest.raises(UsageError, match=error):
        _listen(text)
