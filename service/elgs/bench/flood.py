"""Queue flood (issue 11, defect 2): N requests sent at once to a running server, then a probe.

    elgs serve --models efficientnet_lite0 --port 8011 &
    elgs bench flood --url http://127.0.0.1:8011 --requests 600

Prints how many got each status, when the 503s arrived (median and p95 seconds after sending),
whether any admitted request got a 504, and how long a probe sent into the full queue took.
"""

from __future__ import annotations

import asyncio
import io
import statistics
import time

from elgs.images import sample_photo


def _photo_jpeg(size: int = 224) -> bytes:
    image = sample_photo("chelsea").resize((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _raw_post(host: str, port: int, path: str, data: bytes) -> bytes:
    """One multipart POST as raw bytes: a light client, so the numbers are the server's, not httpx's."""
    boundary = "elgsflood"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cat.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _send(host: str, port: int, payload: bytes) -> tuple[int, float, str | None]:
    """Status, seconds from connecting to the status line, and Retry-After (0 status: connection failed)."""
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await writer.drain()
        status_line = await reader.readline()
        elapsed = time.monotonic() - started
        headers = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        writer.close()
    except (OSError, asyncio.IncompleteReadError):
        return 0, time.monotonic() - started, None
    retry_after = next((line.split(":", 1)[1].strip() for line in headers.split("\r\n")
                        if line.startswith("retry-after:")), None)
    return int(status_line.split()[1]), elapsed, retry_after


async def flood(url: str, requests: int, path: str, probe_after_s: float = 5.0) -> dict:
    """Send ``requests`` copies of one JPEG to ``url`` + ``path`` at once, probe after ``probe_after_s``;
    the statuses, when the 503s came, their Retry-After range, the slowest 200 and the probe."""
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    payload = _raw_post(host, int(port), path, _photo_jpeg())
    tasks = [asyncio.ensure_future(_send(host, int(port), payload)) for _ in range(requests)]
    await asyncio.sleep(probe_after_s)  # the flood is queued and refused: probe the full queue
    probe_status, probe_s, probe_retry = await _send(host, int(port), payload)
    outcomes = await asyncio.gather(*tasks)
    statuses = [status for status, _, _ in outcomes]
    refused = sorted(seconds for status, seconds, _ in outcomes if status == 503)
    served = sorted(seconds for status, seconds, _ in outcomes if status == 200)
    retry_afters = sorted(int(r) for status, _, r in outcomes if status == 503 and r and r.isdigit())
    return {
        "requests": requests,
        "statuses": {str(code): statuses.count(code) for code in sorted(set(statuses))},
        "median_503_s": round(statistics.median(refused), 3) if refused else None,
        "p95_503_s": round(refused[int(0.95 * (len(refused) - 1))], 3) if refused else None,
        "retry_after_s": [retry_afters[0], retry_afters[-1]] if retry_afters else None,
        "max_200_s": round(served[-1], 3) if served else None,
        "probe": {"status": probe_status, "seconds": round(probe_s, 3), "retry_after": probe_retry},
    }
