"""Writes the benchmark's fixture app: the same tree for the same seed, on any machine.

Usage: fixture.py APP_DIR WEBAPP_DIR [--large]

The normal app has about 3,000 files and 40 MB of python-like source, which compresses well, and
random blobs, which do not. It includes the example web app (app.py, its unit file, the bottle
wheel and requirements.txt), so the service starts after every push. With --large the app is about
1 GB, nearly all of it large random files, for the client memory measurement.
"""

import random
import shutil
import sys
from pathlib import Path

SEED = 20240601
SOURCE_FILES = 2940
SOURCE_BYTES = 20_000_000
BLOB_FILES = 50
BLOB_BYTES = 20_000_000
LARGE_FILES = 64
LARGE_BYTES = 1_000_000_000

WORDS = (
    "account address amount batch buffer cache client config connection context cursor "
    "deadline entry event factory field filter handler header index item key limit listener "
    "manager message metric node offset order parser path payload policy pool queue record "
    "region request response result retry route schema session signal source state status "
    "stream task timeout token user value version worker"
).split()


def identifier(rng, parts=2):
    return "_".join(rng.choice(WORDS) for _ in range(parts))


def python_source(rng, size):
    """Returns python-looking text of about `size` bytes: imports, classes and functions."""
    lines = [f'"""{identifier(rng, 3).replace("_", " ").capitalize()}."""', ""]
    for _ in range(rng.randint(2, 5)):
        lines.append(f"from {identifier(rng, 1)}.{identifier(rng, 1)} import {identifier(rng)}")
    lines.append("")
    length = sum(len(line) + 1 for line in lines)
    while length < size:
        block = [f"class {identifier(rng, 2).title().replace('_', '')}:", ""]
        for _ in range(rng.randint(1, 4)):
            name, argument = identifier(rng), identifier(rng, 1)
            block.append(f"    def {name}(self, {argument}, timeout={rng.randint(1, 600)}):")
            block.append(f'        """Return the {identifier(rng, 1)} for {argument}."""')
            for _ in range(rng.randint(2, 8)):
                block.append(
                    f"        {identifier(rng)} = self.{identifier(rng)}({argument}, "
                    f"{rng.randint(0, 9999)})"
                )
            block.append(f"        return {identifier(rng)}")
            block.append("")
        lines.extend(block)
        length += sum(len(line) + 1 for line in block)
    return "\n".join(lines) + "\n"


def copy_webapp(webapp, app):
    shutil.copy(webapp / "app.py", app / "app.py")
    (app / "deploy").mkdir()
    shutil.copy(webapp / "deploy" / "webapp.service", app / "deploy" / "webapp.service")
    shutil.copytree(webapp / "wheels", app / "wheels")
    shutil.copy(webapp / "requirements.txt", app / "requirements.txt")


def write_normal(rng, app):
    mean = SOURCE_BYTES // SOURCE_FILES
    for index in range(SOURCE_FILES):
        package = app / "pkg" / f"area_{index % 30:02d}" / f"module_{index // 300:02d}"
        package.mkdir(parents=True, exist_ok=True)
        size = rng.randint(mean // 4, mean * 7 // 4)
        (package / f"{identifier(rng)}_{index:04d}.py").write_text(python_source(rng, size))
    blobs = app / "static" / "blobs"
    blobs.mkdir(parents=True)
    for index in range(BLOB_FILES):
        (blobs / f"asset_{index:03d}.bin").write_bytes(rng.randbytes(BLOB_BYTES // BLOB_FILES))


def write_large(rng, app):
    for index in range(20):
        (app / "pkg").mkdir(exist_ok=True)
        (app / "pkg" / f"module_{index:02d}.py").write_text(python_source(rng, 8000))
    blobs = app / "data"
    blobs.mkdir()
    chunk = 4 << 20
    for index in range(LARGE_FILES):
        with open(blobs / f"part_{index:03d}.bin", "wb") as file:
            left = LARGE_BYTES // LARGE_FILES
            while left > 0:
                file.write(rng.randbytes(min(chunk, left)))
                left -= chunk


def main():
    if len(sys.argv) not in (3, 4) or (len(sys.argv) == 4 and sys.argv[3] != "--large"):
        sys.exit("usage: fixture.py APP_DIR WEBAPP_DIR [--large]")
    app, webapp = Path(sys.argv[1]), Path(sys.argv[2])
    if app.exists():
        sys.exit(f"fixture.py: {app} already exists; remove it or pick a new directory")
    app.mkdir(parents=True)
    copy_webapp(webapp, app)
    rng = random.Random(SEED)
    if len(sys.argv) == 4:
        write_large(rng, app)
    else:
        write_normal(rng, app)


if __name__ == "__main__":
    main()
