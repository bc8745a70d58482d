"""catalog: the list of items. One replica."""

from __future__ import annotations

import os

from common import serve

ITEMS = [{"id": 1, "name": "teapot"}, {"id": 2, "name": "kettle"}, {"id": 3, "name": "cup"}]


def route(path: str) -> tuple[int, object]:
    if path.startswith("/items"):
        return 200, {"items": ITEMS, "served_by": f"catalog-{os.environ.get('REPLICA')}"}
    return 404, {"error": "not found"}


serve("catalog", route)
