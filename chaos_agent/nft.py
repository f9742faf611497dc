"""The one way the agent runs `nft`: an argument vector, never a shell.

Both nftables users (the partition fault and the proxy latency engine) go
through `run`: inside a network namespace by `nsenter --net=PATH`, a ruleset
on stdin, a timeout (a hung `nft` must not hold an apply or a revert), and
nft's own message in the error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Final

# Seconds an nft invocation may take before it counts as stuck.
TIMEOUT_S: Final = 10.0


class NftError(RuntimeError):
    """`nft` exited non-zero or hung; the text carries its stderr."""


async def run(
    netns: str | Path | None,
    args: Sequence[str],
    stdin: str = "",
    *,
    timeout_s: float = TIMEOUT_S,
) -> str:
    """Run `nft ARGS` (in the namespace at `netns`), return its stdout."""
    argv = ["nft", *args]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", "--", *argv]
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(stdin.encode()), timeout_s
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        msg = f"nft did not answer within {timeout_s:g}s"
        raise NftError(msg) from None

    if process.returncode != 0:
        message = stderr.decode(errors="replace").strip()
        raise NftError(message or f"nft exited {process.returncode}")
    return stdout.decode(errors="replace")
