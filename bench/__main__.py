"""Run every benchmark module (or the ones named) and print their figures."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import bench


def main(argv: list[str]) -> int:
    modules = pkgutil.iter_modules(bench.__path__)
    names = argv or sorted(m.name for m in modules if not m.name.startswith("_"))
    failed = []
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        if not hasattr(module, "main"):
            continue
        print(f"\n=== bench.{name} ===", flush=True)
        started = time.monotonic()
        try:
            module.main()
        except Exception as exc:  # one broken benchmark must not hide the rest
            failed.append(name)
            print(f"bench.{name} failed: {exc!r}", flush=True)
        print(f"--- bench.{name}: {time.monotonic() - started:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
