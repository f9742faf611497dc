"""What a test session leaves behind on the machine, to fail the session if
anything outlives it.

Each test cleans up after itself and many check it; this is the net under
them all. Before the first test `snapshot()` records what exists, and after
the last `leftovers()` names everything new that the session made and did
not remove:

- processes started by the session: every process inherits SESSION_MARKER
  in its environment (set by `mark_session`), so a stressor whose agent was
  SIGKILLed counts too, though init has adopted it;
- network namespaces and links in the root namespace named like the ones
  tests, the demo and agents create (`as...`, `aftershock...`);
- nftables tables in the root namespace named `aftershock...`, and qdiscs
  there with the agent's handles (a5xx:);
- cgroup directories named `aftershock...` (the agent's fault cgroups and
  their parent), in any hierarchy.

Only names this project uses count, so a second test session or a demo on
the same machine is not mistaken for a leak, as long as it started before
this one.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Final

SESSION_MARKER: Final = "AFTERSHOCK_TEST_SESSION"
NAME_PREFIXES: Final = ("as", "aftershock")
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# A process sent SIGTERM by the last test may still be reverting.
PROCESS_GRACE_S: Final = 15.0


def mark_session() -> str:
    """Put this session's marker into the environment children inherit."""
    marker = str(os.getpid())
    os.environ[SESSION_MARKER] = marker
    return marker


def snapshot() -> set[str]:
    return {*_namespaces(), *_links(), *_nft_tables(), *_qdiscs(), *_cgroups()}


def leftovers(
    before: set[str], marker: str, grace_s: float = PROCESS_GRACE_S
) -> list[str]:
    """Everything new since `before`, plus the processes that carry `marker`
    and are still alive `grace_s` later."""
    deadline = time.monotonic() + grace_s
    processes = _session_processes(marker)
    while processes and time.monotonic() < deadline:
        time.sleep(0.5)
        processes = _session_processes(marker)
    return sorted(snapshot() - before) + processes


def _ours(name: str) -> bool:
    return name.startswith(NAME_PREFIXES)


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def _rows(*argv: str) -> list[list[str]]:
    """The words of each line `argv` prints."""
    return [line.split() for line in _run(*argv).splitlines()]


def _namespaces() -> list[str]:
    # "as-lab-1 (id: 3)"
    rows = _rows("ip", "netns", "list")
    return [f"netns {words[0]}" for words in rows if words and _ours(words[0])]


def _links() -> list[str]:
    found = []
    for line in _run("ip", "-o", "link", "show").splitlines():
        # "7: asbr123@if6: <...>" -> "asbr123"
        parts = line.split(":", 2)
        if len(parts) == 3:
            name = parts[1].strip().split("@", 1)[0]
            if _ours(name):
                found.append(f"link {name}")
    return found


def _nft_tables() -> list[str]:
    # "table inet aftershock_px_..."
    rows = _rows("nft", "list", "tables")
    return [
        f"nft table {words[1]} {words[2]}"
        for words in rows
        if len(words) == 3 and _ours(words[2])
    ]


def _qdiscs() -> list[str]:
    # "qdisc htb a5f5: dev eth0 root refcnt 2 ..."
    rows = _rows("tc", "qdisc", "show")
    return [
        f"qdisc {words[1]} {words[2]} dev {words[4]}"
        for words in rows
        if len(words) >= 5 and words[2].startswith("a5") and words[3] == "dev"
    ]


def _cgroups() -> list[str]:
    found = []
    for directory, subdirs, _ in os.walk(CGROUP_ROOT):
        for name in subdirs:
            if _ours(name):
                found.append(f"cgroup {Path(directory) / name}")
        # Below one of ours everything is ours; no need to walk it.
        subdirs[:] = [name for name in subdirs if not _ours(name)]
    return found


def _session_processes(marker: str) -> list[str]:
    found = []
    needle = f"{SESSION_MARKER}={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if needle in environ.split(b"\0"):
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            found.append(f"process {entry.name}: {argv[:160]}")
    return found
