"""The cloud view of an S3 run: objects, requests and time per strategy, and time modelled at a real round trip.

A local server answers in well under a millisecond; an object store in 10-50 ms. The model adds
that latency to what was measured, per request, as if ``concurrency`` requests overlapped all the
time: ``modelled = measured + requests x RTT / concurrency``. It is a floor, not a forecast: a
strategy that waits for one request before the next (each tensor's metadata, one tensor after
another) overlaps fewer, so its real time is longer. A run through the delay proxy
(``--s3-rtt-ms``) measures the real thing; its rows are shown as measured, never modelled again.
"""

from __future__ import annotations

import pandas as pd

from . import verdict
from .formatting import count, sig
from .results import succeeded
from .study import ordered

RTT_MS = 20.0
"""A typical round trip to an object store in the same region (10-50 ms)."""
CONCURRENCY = 32
"""Requests in flight at once: TensorStore's default ``s3_request_concurrency``."""
REQUESTS = ("requests_put", "requests_get", "requests_head", "requests_delete")


def is_cloud(results: pd.DataFrame) -> bool:
    return verdict.store_kind(results) == "s3"


def modelled(results: pd.DataFrame, rtt_ms: float = RTT_MS, concurrency: int = CONCURRENCY) -> pd.DataFrame:
    """The rows with ``save_modelled_s`` and ``load_modelled_s``: measured plus each request's share of the RTT.

    Rows measured with injected latency already carry it: their modelled times stay empty.
    """
    rows = succeeded(results).copy()
    total = rows[list(REQUESTS)].sum(axis=1, min_count=len(REQUESTS))
    per_request = rtt_ms / 1000 / concurrency
    injected = rows["injected_rtt_ms"].fillna(0) > 0
    rows["save_modelled_s"] = (rows["save_s"] + rows["requests_save"] * per_request).mask(injected)
    rows["load_modelled_s"] = (rows["load_cold_s"] + (total - rows["requests_save"]) * per_request).mask(injected)
    return rows


def summary(results: pd.DataFrame, rtt_ms: float = RTT_MS, concurrency: int = CONCURRENCY) -> pd.DataFrame:
    """Medians per strategy of the S3 columns and the times, measured and modelled (numbers, for data)."""
    rows = modelled(results, rtt_ms, concurrency)
    columns = [
        "save_s",
        "load_cold_s",
        "save_modelled_s",
        "load_modelled_s",
        "objects",
        *REQUESTS,
        "requests_save",
        "bytes_sent",
        "bytes_received",
        "injected_rtt_ms",
    ]
    table = rows.groupby("strategy", sort=False)[columns].median()
    table.insert(0, "repeats", rows.groupby("strategy", sort=False).size())
    return table.reindex(ordered(table.index))


def table(results: pd.DataFrame, rtt_ms: float = RTT_MS, concurrency: int = CONCURRENCY) -> pd.DataFrame:
    """The cloud table as people read it: times in s, counts, MB; modelled columns say at what RTT and concurrency."""
    numbers = summary(results, rtt_ms, concurrency)
    at = f"@ {rtt_ms:g} ms x {concurrency}"
    injected = numbers["injected_rtt_ms"].dropna()
    measured = f"(+{injected.iloc[0]:g} ms RTT injected)" if len(injected) else "(local server)"
    return pd.DataFrame(
        {
            f"save s {measured}": numbers["save_s"].map(sig),
            f"cold load s {measured}": numbers["load_cold_s"].map(sig),
            f"save s MODELLED {at}": numbers["save_modelled_s"].map(sig),
            f"cold load s MODELLED {at}": numbers["load_modelled_s"].map(sig),
            "objects": numbers["objects"].map(count),
            "PUT": numbers["requests_put"].map(count),
            "GET": numbers["requests_get"].map(count),
            "HEAD": numbers["requests_head"].map(count),
            "DELETE": numbers["requests_delete"].map(count),
            "MB sent": (numbers["bytes_sent"] / 1e6).map(sig),
            "MB received": (numbers["bytes_received"] / 1e6).map(sig),
        },
        index=numbers.index.rename(None),
    )


def verdicts(results: pd.DataFrame) -> pd.DataFrame:
    """The cloud claims (``study.CLAIMS`` with store ``s3``) judged on an S3 run's rows."""
    return verdict.check(results)
