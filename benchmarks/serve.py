"""Served throughput and latency under a bounded load, next to offline batched prediction of the same model.

    python benchmarks/serve.py [--config configs/lite/cm-memes.yaml] [--requests 64] [--clients 1 8 32]

Starts ``mmsenti serve`` on 127.0.0.1 (its own process, micro-batching at --max-batch-size / --max-wait-ms), then
for each number of concurrent clients sends a fixed number of one-post requests (JSON, image as base64; httpx
async clients) and prints throughput, p50/p95/p99 latency and error counts. In the same run it measures offline
``Predictor.predict_samples`` throughput at batch 32 on the same posts (image decoding included) and prints the
served/offline ratio. Posts are real cm_memes memes from ``../shared/data`` (else generated scenes posts); the model
has pretrained backbones and untrained INFIG layers (speed does not depend on training).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, payloads: list[bytes], clients: int, requests: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_request = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < requests:
            body = payloads[next_request % len(payloads)]
            next_request += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(f"{url}/v1/predict", content=body, headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
            except httpx.HTTPError as e:
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                continue
            latencies.append(1000 * (time.perf_counter() - t0))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "ok": len(latencies), "errors": errors,
            "posts_per_s": len(latencies) / wall, "p50": percentile(latencies, 0.5) if latencies else float("nan"),
            "p95": percentile(latencies, 0.95) if latencies else float("nan"),
            "p99": percentile(latencies, 0.99) if latencies else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/lite/cm-memes.yaml")
    p.add_argument("--requests", type=int, default=128, help="requests per load level (half at 1 client)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args()
    import httpx
    from inference import build_saved_model, write_posts

    import mmsenti  # noqa: F401  (compat shim before transformers/timm)
    from mmsenti.data.base import Sample
    from mmsenti.inference import load_model

    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1/5/15 min), {os.cpu_count()} CPUs")
    tmp = Path(tempfile.mkdtemp(prefix="mmsenti-serve-bench-"))
    build_saved_model(args.config, tmp / "model")
    posts_path, source = write_posts(tmp, max(args.requests, 64))
    posts = [json.loads(x) for x in posts_path.read_text().splitlines()]
    predictor = load_model(tmp / "model", "cpu")
    modalities = predictor.modalities

    def payload(post: dict) -> bytes:
        body = {"id": post["id"]}
        if "text" in modalities:
            body["text"] = post["text"]
        if "image" in modalities:
            image = Path(post["image"]) if Path(post["image"]).is_absolute() else posts_path.parent / post["image"]
            body["image"] = base64.b64encode(image.read_bytes()).decode()
        return json.dumps(body).encode()

    payloads = [payload(x) for x in posts]
    samples = [Sample(id=x["id"], label=None, text=x["text"], image=x["image"] if "image" in modalities else None)
               for x in posts]
    predictor.predict_samples(samples[:32], batch_size=32)  # warm-up
    t0 = time.perf_counter()
    predictor.predict_samples(samples, batch_size=32)
    offline = len(samples) / (time.perf_counter() - t0)
    del predictor

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mmsenti", "serve", str(tmp / "model"), "--port", str(port),
                               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
                               "--device", "cpu"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise SystemExit(f"mmsenti serve exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("mmsenti serve did not become ready")
            time.sleep(0.3)
        asyncio.run(load(url, payloads, 4, 16))  # warm-up
        rows = [asyncio.run(load(url, payloads, c, args.requests // 2 if c == 1 else args.requests))
                for c in args.clients]
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"model: {args.config} (pretrained backbones, untrained INFIG layers); posts: {source}")
    print(f"server: --max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms}; "
          f"one post per request; client and server share the machine")
    print(f"\noffline Predictor.predict_samples, batch 32, decoding included: {offline:.1f} posts/s")
    print(f"\n{'clients':>7} {'requests':>8} {'posts/s':>8} {'vs offline':>10} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'p99 ms':>8}  errors")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['posts_per_s']:>8.1f} {r['posts_per_s'] / offline:>9.0%} "
              f"{r['p50']:>8.0f} {r['p95']:>8.0f} {r['p99']:>8.0f}  {sum(r['errors'].values())} {r['errors'] or ''}")
    top = rows[-1]
    print(f"\ngoals: 0 errors: {'met' if all(not r['errors'] for r in rows) else 'NOT met'}; "
          f"{top['clients']} clients >= 70 % of offline: {top['posts_per_s'] / offline:.0%} "
          f"({'met' if top['posts_per_s'] >= 0.7 * offline else 'NOT met'})")


if __name__ == "__main__":
    main()
