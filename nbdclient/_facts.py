"""What a connected export is and allows, from the flags and contexts its handshake
settled (libnbd's names: ``is_read_only``, ``can_flush``, ``can_multi_conn``, ...)."""

from __future__ import annotations

from collections.abc import Mapping

from .constants import BASE_ALLOCATION, TransmissionFlag


class ExportFacts:
    """The predicates of a :class:`~nbdclient.client.Client` about its export."""

    size: int
    flags: TransmissionFlag
    meta_contexts: Mapping[str, int]
    structured_replies: bool

    def get_size(self) -> int:
        return self.size

    def _has(self, flag: TransmissionFlag) -> bool:
        return flag in self.flags

    def is_read_only(self) -> bool:
        return self._has(TransmissionFlag.READ_ONLY)

    def can_flush(self) -> bool:
        return self._has(TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._has(TransmissionFlag.SEND_FUA)

    def can_trim(self) -> bool:
        return self._has(TransmissionFlag.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_WRITE_ZEROES)

    def can_fast_zero(self) -> bool:
        return self._has(TransmissionFlag.SEND_FAST_ZERO)

    def can_df(self) -> bool:
        return self._has(TransmissionFlag.SEND_DF) and self.structured_replies

    def can_cache(self) -> bool:
        return self._has(TransmissionFlag.SEND_CACHE)

    def can_multi_conn(self) -> bool:
        return self._has(TransmissionFlag.CAN_MULTI_CONN)

    def can_block_status(self, context: str = BASE_ALLOCATION) -> bool:
        return context in self.meta_contexts
