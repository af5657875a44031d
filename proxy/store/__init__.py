"""Ledger stores behind one protocol: memory://, sqlite:///PATH, redis://HOST:PORT/DB."""
from proxy.store.base import LedgerStore, Reservation, UsageRow
from proxy.store.factory import open_store

__all__ = ["LedgerStore", "Reservation", "UsageRow", "open_store"]
