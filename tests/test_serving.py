"""Self-distillation through OpenAI-compatible servers: a real `transformers serve` on 127.0.0.1, and a small
local HTTP server that fails on purpose to exercise retries, failure records and resume."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import httpx
import pytest
from typer.testing import CliRunner

from sd2.cli import app
from sd2.config import DistillConfig
from sd2.distill import distill
from sd2.errors import UserError

pytestmark = pytest.mark.slow  # real servers / subprocesses / packaged models: `pytest -m "not slow"` skips

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    port = _port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = subprocess.Popen([str(BIN / "transformers"), "serve", str(tiny_model_dir), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--dtype", "float32"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def test_openai_backend_matches_in_process_greedy(served, tiny_model_dir, seed_file, tmp_path):
    common = dict(target=str(tiny_model_dir), prompts=str(seed_file), max_new_tokens=8, shard_size=4)
    ref = distill(DistillConfig(out=tmp_path / "hf", batch_size=1, **common), progress=False)
    srv = distill(DistillConfig(out=tmp_path / "srv", backend="openai", base_urls=[served], api="completions",
                                concurrency=3, **common), progress=False)
    a = datasets.load_from_disk(str(ref)).to_list()
    b = datasets.load_from_disk(str(srv)).to_list()
    assert [r["source_id"] for r in a] == [r["source_id"] for r in b]
    same = sum(x["response"] == y["response"] for x, y in zip(a, b))
    assert same == len(a), f"{same}/{len(a)} responses equal"
    man = json.loads((srv / "sd2_manifest.json").read_text())
    assert man["backend"] == "openai" and man["served_model"] == str(tiny_model_dir)


def test_openai_backend_bad_input(served, tiny_model_dir, seed_file, tmp_path):
    r = CliRunner()
    dead = f"http://127.0.0.1:{_port()}"
    base = ["distill", "--target", str(tiny_model_dir), "--prompts", str(seed_file), "--backend", "openai",
            "--out", str(tmp_path / "o")]
    res = r.invoke(app, [*base, "--base-url", dead])
    assert res.exit_code == 2 and "unreachable" in res.output and len(res.output.strip().splitlines()) == 1
    res = r.invoke(app, [*base, "--base-url", served, "--served-model", "someone/else"])
    assert res.exit_code == 2 and "not served" in res.output
    res = r.invoke(app, [*base])
    assert res.exit_code == 2 and "--base-url" in res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


class _Flaky(BaseHTTPRequestHandler):
    """An OpenAI-style server that answers 500 (then an empty text) for one prompt until healed."""

    healed = False
    calls = 0

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": "m"}]})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        prompt = req["messages"][0]["content"]
        type(self).calls += 1
        if "fox number 3" in prompt and not type(self).healed:
            return self._send(500, {"error": "boom"})
        if "fox number 5" in prompt and not type(self).healed:
            return self._send(200, {"choices": [{"message": {"content": ""}, "finish_reason": "stop"}]})
        self._send(200, {"choices": [{"message": {"content": f"answer to: {prompt}"}, "finish_reason": "stop"}]})


def test_failed_requests_recorded_and_resumed(seed_file, tmp_path):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    cfg = DistillConfig(target="m", prompts=str(seed_file), out=tmp_path / "d", backend="openai", base_urls=[url],
                        max_retries=2, shard_size=4)
    try:
        with pytest.raises(UserError, match="2 request\\(s\\) failed"):
            distill(cfg, progress=False)
        rows = [json.loads(x) for f in sorted((tmp_path / "d.partial" / "shards").glob("*.jsonl"))
                for x in f.read_text().splitlines()]
        assert len(rows) == 10 and sum("error" in r for r in rows) == 2
        assert not (tmp_path / "d").exists()
        _Flaky.healed, before = True, _Flaky.calls
        out = distill(cfg, progress=False)
        assert _Flaky.calls - before == 2  # only the failed two were sent again
        ds = datasets.load_from_disk(str(out))
        assert len(ds) == 10 and all(r["response"].startswith("answer to:") for r in ds)
    finally:
        srv.shutdown()
