"""frontend: calls catalog and reviews by name (http://catalog:8080, ...) with urllib.

It knows nothing about the mesh: urllib honours HTTP_PROXY, which `meshlet up` points at
this replica's sidecar; the sidecar finds the service, balances, and adds mTLS.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from common import serve

CATALOG = os.environ.get("CATALOG_URL", "http://catalog:8080")
REVIEWS = os.environ.get("REVIEWS_URL", "http://reviews:8080")


def fetch(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def route(path: str) -> tuple[int, object]:
    if path not in ("/", "/shop"):
        return 404, {"error": "not found"}
    try:
        items = fetch(f"{CATALOG}/items")
        reviews = fetch(f"{REVIEWS}/reviews")
    except (urllib.error.URLError, OSError) as e:
        return 502, {"error": f"a backend failed: {e}"}
    return 200, {"catalog": items, "reviews": reviews,
                 "served_by": f"frontend-{os.environ.get('REPLICA')}"}


serve("frontend", route)
