"""`aftershock keygen`: the Ed25519 key pair that signs every command.

Registered on the CLI by `coordinator.cli`, which imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from chaos_agent import wire
from coordinator import output
from coordinator.cli import EXIT_USAGE, JsonFlag, app, cli_state


@app.command("keygen")
def keygen_command(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(help="Directory to write NAME.key (mode 0600) and NAME.pub."),
    ] = Path("keys"),
    name: Annotated[
        str, typer.Option(help="File name stem of the pair.")
    ] = "aftershock",
    json_flag: JsonFlag = False,
) -> None:
    """Write an Ed25519 key pair for signing commands.

    Give the private key to the coordinator (`--signing-key FILE` or
    AFTERSHOCK_SIGNING_KEY) and the `.pub` file to every agent (`--trust FILE`
    or CHAOS_AGENT_TRUST). Agents accept any key they trust, so a rotation is:
    trust the new .pub everywhere, switch the coordinator, drop the old .pub.
    Existing files are never overwritten.
    """
    state = cli_state(ctx, json_flag)

    try:
        private_path, public_path = wire.generate_key_pair(out, name)
    except (FileExistsError, OSError) as exc:
        output.error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None

    key_id = wire.key_id(wire.load_public_key(public_path))
    if state.json:
        output.print_json(
            {
                "private_key": str(private_path),
                "public_key": str(public_path),
                "key_id": key_id,
            }
        )
        return
    output.stdout.print(f"private key  {private_path}  (keep it on the coordinator)")
    output.stdout.print(f"public key   {public_path}  (give it to agents: --trust)")
    output.stdout.print(f"key id       {key_id}")
