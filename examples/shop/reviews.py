"""reviews: star ratings per item. Two replicas; each says which one answered."""

from __future__ import annotations

import os
import random

from common import serve


def route(path: str) -> tuple[int, object]:
    if path.startswith("/reviews"):
        stars = {str(i): round(random.uniform(3, 5), 1) for i in (1, 2, 3)}
        return 200, {"stars": stars, "served_by": f"reviews-{os.environ.get('REPLICA')}"}
    return 404, {"error": "not found"}


serve("reviews", route)
