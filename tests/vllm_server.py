"""Runs ``vllm serve`` with the plugin once and asks it over HTTP (run by tests/test_vllm_plugin.py).

Runs inside the vLLM environment (scripts/setup_vllm.sh), never imported by
the test suite itself: ``python vllm_server.py JOB.json OUT.json``.

JOB: ``{"model": DIR, "args": [extra `vllm serve` arguments], "chat": [{"name", "parts":
[text | {"image": PNG path} | {"image_url": URL} | {"raw": part}], "max_tokens", "extra": {request fields}}],
"log": PATH}``. The server is started once on 127.0.0.1 on a free port (the
``vllm`` console script of this environment, as the README shows it), every
request is sent in order with ``requests`` (bounded timeouts), and the server
is stopped by its PID. OUT: ``{"port", "startup_s", "results": {name: {"status", "tokens", "logprobs" | "error"}},
"health_after": status, "returncode_before_stop": None | code, "log_bytes_before_stop"}``.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time

# A chat template that writes the parts as they come: text as is, each image as <image>.
CHAT_TEMPLATE = ("{% for m in messages %}{% for p in m['content'] %}"
                 "{% if p['type'] == 'text' %}{{ p['text'] }}{% else %}<image>{% endif %}"
                 "{% endfor %}{% endfor %}")
STARTUP_S = 420
REQUEST_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _content(parts):
    out = []
    for p in parts:
        if isinstance(p, str):
            out.append({"type": "text", "text": p})
        elif "image" in p:
            data = base64.b64encode(open(p["image"], "rb").read()).decode()
            out.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        elif "image_url" in p:
            out.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            out.append(p["raw"])
    return out


def main(job_path: str, out_path: str) -> None:
    import requests

    job = json.load(open(job_path))
    folder = os.path.dirname(os.path.abspath(out_path))
    template = os.path.join(folder, "chat_template.jinja")
    open(template, "w").write(CHAT_TEMPLATE)
    port = _free_port()
    vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
    cmd = [vllm, "serve", job["model"], "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "tiny",
           "--chat-template", template, "--chat-template-content-format", "openai",
           # the tiny model's few MiB, as vllm_worker.KV_CACHE_BYTES (importing that script here would set
           # its environment defaults for the server too)
           "--kv-cache-memory-bytes", str(128 * 2**20), *job["args"]]
    log = open(job["log"], "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    out = {"port": port, "results": {}, "returncode_before_stop": None}
    try:
        start = time.monotonic()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({server.returncode}) before it served; see {job['log']}")
            if time.monotonic() - start > STARTUP_S:
                raise RuntimeError(f"vllm serve not healthy after {STARTUP_S} s; see {job['log']}")
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        out["startup_s"] = round(time.monotonic() - start, 1)
        for req in job["chat"]:
            body = {"model": "tiny", "messages": [{"role": "user", "content": _content(req["parts"])}],
                    "max_tokens": req.get("max_tokens", 6), "temperature": 0, "return_token_ids": True,
                    "logprobs": True,
                    **req.get("extra", {})}
            try:
                r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=REQUEST_S)
            except requests.RequestException as e:  # the server died of it (see the log)
                res = {"status": None, "error": f"{type(e).__name__}: {e}"}
            else:
                res = {"status": r.status_code}
                if r.status_code == 200:
                    choice = r.json()["choices"][0]
                    res["tokens"] = choice["token_ids"]
                    res["logprobs"] = [c["logprob"] for c in choice["logprobs"]["content"]]
                else:
                    res["error"] = r.text[-2000:]
            out["results"][req["name"]] = res
        try:
            out["health_after"] = requests.get(f"{base}/health", timeout=10).status_code
        except requests.RequestException as e:
            out["health_after"] = f"{type(e).__name__}: {e}"
        out["returncode_before_stop"] = server.poll()
        out["log_bytes_before_stop"] = os.path.getsize(job["log"])  # what it logged while serving (not stopping)
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGTERM)  # the API server; it stops the engine process it started
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)  # the group of the server started above
                server.wait(timeout=30)
        log.close()
        json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
