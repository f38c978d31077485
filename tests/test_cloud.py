"""Checkpoints on a real S3 server (SeaweedFS on loopback): exact round trips, counted requests, the claim, errors."""

from __future__ import annotations

import errno
import io
import os
import socket
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient

from ckptbench import (
    Benchmark,
    CheckpointError,
    RunConfig,
    checkpoint,
    cloud,
    docs,
    get_strategy,
    study,
    verdict,
)
from ckptbench.cli import main
from ckptbench.delayproxy import DelayProxy
from ckptbench.manifest import MANIFEST
from ckptbench.objectstore import Prefix, S3Storage
from ckptbench.results import COLUMNS, HEADER, ResultsFile, read_results, row
from ckptbench.s3server import S3Server, S3ServerError

from conftest import FAKE_LIMITS, NOTEBOOK, NOTEBOOK_TIMEOUT, dead_pid, tagged

ON_S3 = ["tensorstore", "ts+chunks", "ts+ocdbt", "ts+best", "ts+zarr3", "pytorch", "safetensors"]
ZARR_PER_OBJECT = ["tensorstore", "ts+chunks", "ts+best"]
"""Strategies whose every object is written once by one PUT: their PUTs and bytes equal the listing exactly."""


def _listing(s3: S3Server, prefix: str) -> tuple[int, int]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    objects = [o for page in pages for o in page.get("Contents", [])]
    return len(objects), sum(o["Size"] for o in objects)


@pytest.fixture(scope="module")
def measured(s3, tiny, tmp_path_factory) -> tuple[Benchmark, pd.DataFrame]:
    """One run of the strategies on S3, each checkpoint kept (under s3://ckpt/kept/<name>/)."""
    config = RunConfig(
        preset="tiny",
        out=tmp_path_factory.mktemp("s3-run"),
        progress=False,
        warmup=False,
        drift=False,
        keep_checkpoints=True,
        store="s3://ckpt/kept",
        s3_endpoint=s3.endpoint,
    )
    bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
    bench.run(ON_S3)
    return bench, bench.results.set_index("strategy")


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_S3)
def test_round_trip_through_s3_is_bit_exact(name, measured, tiny, s3):
    bench, rows = measured
    assert rows.loc[name, "error"] == ""
    assert rows.loc[name, "verified"]
    assert rows.loc[name, "store"] == "s3://ckpt/kept"
    loaded = checkpoint.load(get_strategy(name), bench.storage.root / name, lambda n: None)
    assert list(loaded) == list(tiny.tensors)
    for tensor, want in tiny.tensors.items():
        got = loaded[tensor]
        assert got.dtype == want.dtype, tensor
        assert got.shape == want.shape, tensor
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), tensor


@pytest.mark.slow
@pytest.mark.parametrize("name", ON_S3)
def test_counts_agree_with_the_servers_listing_of_the_kept_checkpoint(name, measured, s3):
    _, rows = measured
    row = rows.loc[name]
    objects, size = _listing(s3, f"kept/{name}/")
    assert (row["objects"], row["bytes"]) == (objects, size)
    assert row["requests_delete"] == 0  # a fresh prefix: nothing to delete (no delete_existing)
    assert row["requests_get"] >= objects - 1  # the load reads every object (the manifest is read once)
    assert row["bytes_received"] >= size  # every byte read back
    assert 0 < row["requests_save"] < row["requests_put"] + row["requests_get"] + row["requests_head"]
    if name in ZARR_PER_OBJECT:
        assert row["requests_put"] == objects
        assert row["bytes_sent"] == size
        assert row["requests_head"] == 0  # the conditional write replaces the HEAD before each metadata PUT
    elif name == "ts+ocdbt":  # OCDBT rewrites its manifest with every commit: more PUTs than objects
        assert row["requests_put"] > objects
        assert row["bytes_sent"] > size
    elif name == "ts+zarr3":  # one shard object per tensor plus its metadata, each written once
        assert row["requests_put"] == objects == 2 * 238 + 1
        assert row["bytes_sent"] == size
    else:  # one object below the multipart threshold, plus the manifest; the download starts with a HEAD
        assert (objects, row["requests_put"], row["requests_head"]) == (2, 2, 1)
        assert row["bytes_sent"] == size


@pytest.mark.slow
def test_ocdbt_writes_far_fewer_objects_than_the_baseline(measured):
    _, rows = measured
    assert 3 * rows.loc["ts+ocdbt", "objects"] < rows.loc["tensorstore", "objects"]
    assert rows.loc["ts+chunks", "objects"] < rows.loc["tensorstore", "objects"]


@pytest.mark.slow
def test_the_cloud_claim_is_judged_on_the_s3_rows(measured):
    _, rows = measured
    table = verdict.check(rows.reset_index()).set_index("key")
    assert list(table.index) == [c.key for c in study.CLAIMS if c.store == "s3"]
    assert table.loc["ocdbt_cloud", "verdict"] in (verdict.HELD, verdict.NOT_HELD, verdict.INCONCLUSIVE)
    assert "ts+ocdbt objects / tensorstore objects = " in table.loc["ocdbt_cloud", "measured"]
    shown = cloud.table(rows.reset_index(), rtt_ms=20, concurrency=32)
    assert list(shown.index) == [
        "pytorch",
        "tensorstore",
        "ts+chunks",
        "ts+ocdbt",
        "safetensors",
        "ts+zarr3",
        "ts+best",
    ]
    assert "save s MODELLED @ 20 ms x 32" in shown.columns


@pytest.mark.slow
@pytest.mark.usefixtures("measured")
def test_nothing_but_the_kept_checkpoints_is_left_and_verify_reads_them(s3, capsys):
    assert _listing(s3, "kept/.work/")[0] == 0
    assert main(["verify", "s3://ckpt/kept/ts+ocdbt", "--s3-endpoint", s3.endpoint]) == 0
    assert "ts+ocdbt checkpoint, 238 tensors, intact" in capsys.readouterr().out


@pytest.mark.slow
def test_the_run_command_measures_on_s3_with_request_counts_and_skips_what_cannot(s3, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--preset", "tiny", "--strategies", "pytorch,dcp", "--no-drift", "--no-warmup", "--out", str(out)]
    assert main([*argv, "--store", "s3://ckpt/cli", "--s3-endpoint", s3.endpoint]) == 0
    printed = capsys.readouterr().out
    assert "skipped dcp: cannot write to s3://ckpt/cli: torch.distributed.checkpoint writes through" in printed
    assert "MODELLED @ 20 ms x 32" in printed
    assert list(pd.read_csv(out / "results.csv").columns) == HEADER
    rows = read_results(out / "results.csv")
    assert rows["strategy"].tolist() == ["pytorch"]
    assert rows["verified"].all()
    assert (rows["requests_put"] == 2).all()
    assert (rows["store"] == "s3://ckpt/cli").all()


def test_list_says_which_strategies_cannot_write_to_s3(capsys):
    assert main(["list", "--wide"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "fsspec writer needs s3fs" in lines["dcp"]
    assert "mmap needs a local file" in lines["pytorch+mmap"]
    assert "file_io_sync is a file knob" in lines["ts+nosync"]
    assert lines["ts+ocdbt"].rstrip().endswith(" ok")


@pytest.mark.slow
def test_an_incomplete_prefix_is_not_a_checkpoint(s3, tiny, capsys):
    """Objects without the manifest (an interrupted save) are refused by load and verify."""
    storage = S3Storage("s3://ckpt/incomplete", s3.endpoint)
    place = storage.root / "pytorch"
    get_strategy("pytorch").save(tiny.tensors, place, lambda n: None)
    with pytest.raises(CheckpointError, match=f"no {MANIFEST}; not a complete"):
        checkpoint.load(get_strategy("pytorch"), place, lambda n: None)
    assert main(["verify", str(place), "--s3-endpoint", s3.endpoint]) == 2
    assert "not a complete ckptbench checkpoint" in capsys.readouterr().err
    storage.discard(place)
    assert _listing(s3, "incomplete/")[0] == 0


@pytest.mark.slow
def test_a_server_that_dies_mid_save_fails_the_repeat_quickly_and_leaves_no_complete_checkpoint(
    tiny, tmp_path, fault_mid_save
):
    data = tmp_path / "s3"
    server = S3Server("ckpt", data_dir=data).start()

    with pytest.MonkeyPatch.context() as env:
        for name, value in server.env.items():
            env.setenv(name, value)
        config = RunConfig(
            preset="tiny", out=tmp_path / "out", progress=False, warmup=False, drift=False,
            store="s3://ckpt/dying", s3_endpoint=server.endpoint,
        )  # fmt: skip
        bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
        started = time.perf_counter()
        (phase,) = bench.run([fault_mid_save(server.stop)])
        assert time.perf_counter() - started < 60
        (row,) = phase.rows
        assert "connect" in row.error.lower()
        assert not row.verified
        restarted = S3Server("ckpt", data_dir=data, port=server.port).start()
        try:
            pages = restarted.client().get_paginator("list_objects_v2").paginate(Bucket="ckpt", Prefix="dying/")
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        finally:
            restarted.stop()
    assert keys  # the save was interrupted halfway: some objects made it
    assert not [k for k in keys if k.endswith(MANIFEST)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_error(argv: list[str], capsys) -> tuple[int, str, float]:
    started = time.perf_counter()
    code = main(["run", "--preset", "tiny", "--strategies", "pytorch", "--no-drift", *argv])
    return code, capsys.readouterr().err, time.perf_counter() - started


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("server down", 1, "cannot reach S3 at http://127.0.0.1:"),
        ("silent endpoint", 1, "accepted the connection but did not answer"),
        ("bad credentials", 2, "refused the key pair in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"),
        ("missing bucket", 2, "bucket 'nosuchbucket' does not exist"),
        ("no credentials", 2, "an s3:// store needs credentials: set AWS_ACCESS_KEY_ID"),
    ],
)
def test_each_store_error_is_one_line_within_seconds_and_writes_nothing(case, code, message, s3, tmp_path, capsys):
    out = tmp_path / "out"
    endpoint, store = s3.endpoint, "s3://ckpt/errors"
    with pytest.MonkeyPatch.context() as env, socket.socket() as silent:
        if case == "server down":
            endpoint = f"http://127.0.0.1:{_free_port()}"
        elif case == "silent endpoint":  # listens (the kernel accepts) but never answers
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        elif case == "bad credentials":
            env.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        elif case == "missing bucket":
            store = "s3://nosuchbucket/errors"
        else:
            env.delenv("AWS_ACCESS_KEY_ID")
        got, err, seconds = _run_error(["--out", str(out), "--store", store, "--s3-endpoint", endpoint], capsys)
    assert got == code
    assert message in err
    assert err.count("\n") == 1
    assert seconds < 30
    assert not (out / "results.csv").exists()
    assert _listing(s3, "errors/")[0] == 0


def test_bad_store_settings_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="expected 'file' or s3://BUCKET/PREFIX"):
        RunConfig(preset="tiny", out=tmp_path, store="gs://bucket/x")
    with pytest.raises(ValueError, match="is not an S3 bucket name"):
        RunConfig(preset="tiny", out=tmp_path, store="s3://B/x")
    with pytest.raises(ValueError, match="need an s3:// --store"):
        RunConfig(preset="tiny", out=tmp_path, s3_endpoint="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        RunConfig(preset="tiny", out=tmp_path, store="s3://ckpt/x", s3_endpoint="127.0.0.1:8333")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_delay_proxy_adds_its_round_trip_and_a_run_through_it_records_it(s3, tiny, tmp_path):
    client = s3.client()
    with DelayProxy(s3.endpoint, rtt_ms=60) as proxy:
        delayed = Prefix("ckpt", "", S3Storage("s3://ckpt/x", proxy.endpoint).endpoint)
        delayed.client.head_bucket(Bucket="ckpt")  # a connection, kept alive from here on
        started = time.perf_counter()
        for _ in range(3):
            delayed.client.head_bucket(Bucket="ckpt")
        through_proxy = (time.perf_counter() - started) / 3
    started = time.perf_counter()
    client.head_bucket(Bucket="ckpt")
    assert through_proxy >= 0.06 > time.perf_counter() - started
    config = RunConfig(
        preset="tiny", out=tmp_path, progress=False, warmup=False, drift=False,
        store="s3://ckpt/delayed", s3_endpoint=s3.endpoint, s3_rtt_ms=30,
    )  # fmt: skip
    bench = Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=lambda message: None)
    (phase,) = bench.run(["pytorch"])
    assert phase.ok
    (row,) = phase.rows
    assert bench.results["injected_rtt_ms"].tolist() == [30]
    assert row.load_cold_s >= 0.03 * 3  # the manifest GET, the HEAD and the download GET each wait a round trip
    assert cloud.modelled(bench.results)["save_modelled_s"].isna().all()  # measured with latency: not modelled


def test_modelled_time_adds_each_requests_share_of_the_round_trip():
    rows = pd.DataFrame(
        [dict.fromkeys(COLUMNS) | {
            "strategy": "a", "error": "", "save_s": 1.0, "load_cold_s": 2.0, "requests_put": 100,
            "requests_get": 300, "requests_head": 0, "requests_delete": 0, "requests_save": 150,
            "store": "s3://b/p",
        }],
        columns=COLUMNS,
    )  # fmt: skip
    got = cloud.modelled(rows, rtt_ms=20, concurrency=10).iloc[0]
    assert got["save_modelled_s"] == pytest.approx(1.0 + 150 * 0.02 / 10)
    assert got["load_modelled_s"] == pytest.approx(2.0 + 250 * 0.02 / 10)
    assert cloud.is_cloud(rows)
    assert not cloud.is_cloud(rows.assign(store="file"))


def test_the_cloud_claim_holds_on_rows_like_a_full_size_run_and_is_not_judged_on_a_disk():
    def rows(store: str) -> pd.DataFrame:
        numbers = {"tensorstore": (100.0, 40.0, 839_000, 839_000), "ts+ocdbt": (30.0, 35.0, 700, 1_500)}
        return pd.DataFrame(
            [
                dict.fromkeys(COLUMNS) | {
                    "strategy": name, "repeat": r, "error": "", "save_s": save * f, "load_cold_s": load * f,
                    "objects": objects, "requests_put": puts, "verified": True, "store": store,
                }
                for name, (save, load, objects, puts) in numbers.items()
                for r, f in enumerate((0.98, 1.0, 1.02))
            ],
            columns=COLUMNS,
        )  # fmt: skip

    (judged,) = verdict.check(rows("s3://b/p")).itertuples()
    assert (judged.key, judged.verdict) == ("ocdbt_cloud", verdict.HELD)
    assert "ocdbt_cloud" not in set(verdict.check(rows("file"))["key"])


def test_a_requested_port_that_is_taken_is_refused(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(S3ServerError, match=f"port {port} on 127.0.0.1 is taken"):
            S3Server(data_dir=tmp_path, port=port).start()
    assert not (Path(tmp_path) / "weed.log").exists()


@pytest.mark.slow
def test_the_notebooks_cloud_section_shows_objects_requests_and_the_verdict(s3, kernel_env, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (parameters,) = tagged(nb, "parameters")
    parameters.source += (
        f'\nPRESET = "tiny"\nSTRATEGIES = "pytorch,ts+best"\nOUT = {str(tmp_path / "out")!r}\nPROGRESS = False'
        f'\nSTORE = "s3://ckpt/notebook"\nS3_ENDPOINT = {s3.endpoint!r}\nCLOUD_RTT_MS = 40\nCLOUD_CONCURRENCY = 8'
    )
    cells = [parameters, *(tagged(nb, tag)[0] for tag in ("approaches", "setup", "measure", "cloud"))]
    client = NotebookClient(
        nb, kernel_name="python3", timeout=NOTEBOOK_TIMEOUT, resources={"metadata": {"path": str(tmp_path)}}
    )
    with client.setup_kernel():
        for index, cell in enumerate(cells):
            cell.outputs = []
            client.execute_cell(cell, index)
    html = "".join(o.get("data", {}).get("text/html", "") for o in cells[-1].outputs)
    table = pd.read_html(io.StringIO(html), index_col=0)[0]
    assert list(table.index) == ["pytorch", "ts+best"]
    assert {"objects", "PUT", "GET", "save s MODELLED @ 40 ms x 8"} <= set(table.columns)
    assert "OCDBT is better for cloud storage" in html
    assert "NOT MEASURED" in html  # neither tensorstore nor ts+ocdbt ran here


@pytest.mark.slow
def test_a_dead_runs_working_prefix_is_removed_and_a_live_or_foreign_one_kept(s3, tiny, tmp_path):
    host = socket.gethostname()
    runs = {
        "dead": f"{host}-{dead_pid()}-abc123",
        "live": f"{host}-{os.getpid()}-abc123",
        "foreign": f"another-host-{dead_pid()}-abc123",
    }
    client = s3.client()
    for run in runs.values():
        for key in (f"stale/.work/{run}/tensorstore.0/x/0.0", f"stale/.work/{run}/tensorstore.0/{MANIFEST}"):
            client.put_object(Bucket="ckpt", Key=key, Body=b"x")
    messages: list[str] = []
    config = RunConfig(preset="tiny", out=tmp_path, store="s3://ckpt/stale", s3_endpoint=s3.endpoint)
    Benchmark(config, checkpoint=tiny, limits=FAKE_LIMITS, log=messages.append).prepare()
    assert _listing(s3, f"stale/.work/{runs['dead']}/")[0] == 0
    assert _listing(s3, f"stale/.work/{runs['live']}/")[0] == 2
    assert _listing(s3, f"stale/.work/{runs['foreign']}/")[0] == 2
    assert any(runs["dead"] in message for message in messages)


def test_the_docs_render_a_cloud_table_from_a_results_file(tmp_path):
    columns = dict.fromkeys(COLUMNS) | {
        "run_id": "r", "timestamp": "t", "preset": "tiny", "strategy": "ts+ocdbt", "config": "{}", "repeat": 0,
        "tensors": 238, "params": 1, "model_bytes": 1, "error": "", "save_s": 2.0, "load_cold_s": 1.0,
        "objects": 700, "requests_put": 1500, "requests_get": 9000, "requests_head": 0, "requests_delete": 0,
        "requests_save": 1600, "bytes_sent": 10**9, "bytes_received": 10**9, "verified": True, "store": "s3://b/p",
        "schema_version": 2,
    }  # fmt: skip
    ResultsFile(tmp_path).append([row(columns)])
    rendered = docs.render(f"cloud {tmp_path / 'results.csv'} 50 16")
    header, _, line = rendered.splitlines()
    assert "save s MODELLED @ 50 ms x 16" in header
    assert line.startswith("| `ts+ocdbt` | 2 | 1 | 7 | 28.8 | 700 | 1,500 | 9,000 | 0 | 0 | 1,000 | 1,000 |")


@pytest.mark.slow
def test_an_s3_run_where_every_strategy_failed_prints_sentences_not_empty_tables(s3, tmp_path, capsys, monkeypatch):
    def refused(*args, **kwargs):
        raise OSError(errno.EACCES, "Access Denied")

    monkeypatch.setattr(checkpoint, "save", refused)
    argv = ["run", "--preset", "tiny", "--strategies", "pytorch,ts+chunks", "--no-drift", "--no-warmup"]
    assert (
        main([*argv, "--out", str(tmp_path / "out"), "--store", "s3://ckpt/all-fail", "--s3-endpoint", s3.endpoint])
        == 1
    )
    printed = capsys.readouterr()
    assert "Empty DataFrame" not in printed.out + printed.err
    assert "no strategy completed: nothing to model" in printed.out
    rows = pd.read_csv(tmp_path / "out" / "results.csv")
    assert rows["strategy"].tolist() == ["pytorch", "ts+chunks"]
    assert rows["error"].str.contains("Access Denied").all()
