"""Container health check: exit 0 when bnexporter's /healthz answers 200.

Slim images have no curl or wget, so the Dockerfile's HEALTHCHECK runs this
with the image's Python. BNEXPORTER_HEALTHCHECK_URL overrides the URL when the
listen address is changed.
"""

import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:10842/healthz"


def main() -> int:
    url = os.environ.get("BNEXPORTER_HEALTHCHECK_URL", DEFAULT_URL)
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
