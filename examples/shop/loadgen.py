"""loadgen: a small traffic generator. Calls http://frontend:8080/ through its sidecar
(HTTP_PROXY) at RATE requests per second and prints a summary every 5 seconds."""

from __future__ import annotations

import collections
import os
import time
import urllib.error
import urllib.request

URL = os.environ.get("TARGET", "http://frontend:8080/")
RATE = float(os.environ.get("RATE", "10"))


def main() -> None:
    counts: collections.Counter[str] = collections.Counter()
    last = time.monotonic()
    while True:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(URL, timeout=5) as r:
                r.read()
                counts[str(r.status)] += 1
        except urllib.error.HTTPError as e:
            counts[str(e.code)] += 1
        except (urllib.error.URLError, OSError) as e:
            counts[type(getattr(e, "reason", e)).__name__] += 1
        if time.monotonic() - last >= 5:
            print("loadgen: last 5 s:", dict(counts), flush=True)
            counts.clear()
            last = time.monotonic()
        time.sleep(max(0.0, 1 / RATE - (time.monotonic() - t0)))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
