"""Builds the three one-replica Swift rings (account, container, object) of a test
server, each with one device on 127.0.0.1.

Run by the *system* Python (Debian's ``python3-swift`` lives there, not in the
project's virtualenv), as ``/usr/bin/python3 swift_rings.py DIR ACCOUNT CONTAINER
OBJECT``: the three numbers are the ports of the servers.  One process builds all three
rings (``swift-ring-builder`` would take nine).
"""

import sys

from swift.common.ring import RingBuilder

PART_POWER = 4  # 16 partitions: one device needs no more


def build(directory: str, kind: str, port: int) -> None:
    builder = RingBuilder(PART_POWER, 1, 0)
    builder.add_dev(
        {
            "id": 0,
            "region": 1,
            "zone": 1,
            "ip": "127.0.0.1",
            "port": port,
            "device": "d1",
            "weight": 1.0,
        }
    )
    builder.rebalance(seed=1)
    builder.get_ring().save(f"{directory}/{kind}.ring.gz")


def main() -> None:
    directory, *ports = sys.argv[1:]
    for kind, port in zip(("account", "container", "object"), ports, strict=True):
        build(directory, kind, int(port))


if __name__ == "__main__":
    main()
