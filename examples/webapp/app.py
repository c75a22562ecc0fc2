"""Example web app that crucible deploys in its tests and demo.

GET /health returns {"release": "<id>"}, where <id> is the name of the release directory this
file runs from, so a test can tell which release is live after a push or rollback.
"""

import os
from pathlib import Path

import bottle

# /srv/webapp/current/app.py resolves to /srv/webapp/releases/<id>/app.py. The name is read
# once at start because a running process keeps serving the code it loaded, whatever
# `current` points to later.
RELEASE = Path(__file__).resolve().parent.name

app = bottle.Bottle()


@app.get("/health")
def health():
    return {"release": RELEASE}


def main():
    host = os.environ.get("WEBAPP_HOST", "127.0.0.1")
    port = int(os.environ.get("WEBAPP_PORT", "8000"))
    bottle.run(app, host=host, port=port, quiet=True)


if __name__ == "__main__":
    main()
