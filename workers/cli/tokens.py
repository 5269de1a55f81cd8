"""`kiln token ...`: API tokens."""

from __future__ import annotations

import typer
from rich.table import Table

from workers.cli.common import (
    SERVER,
    TOKEN,
    _split,
    app,
    console,
    out,
    remote,
)

token_app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)


app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., help="What the token is for"),
    scope: list[str] = typer.Option(["infer"], help="infer, manage, admin or metrics (repeatable)"),
    owner: str | None = typer.Option(None, help="Team (an admin may name another)"),
    server: str | None = SERVER,
    token: str | None = TOKEN,
) -> None:
    """Create a token; it is printed once and stored only as a hash."""
    with remote(server, token) as client:
        t = client.create_token(name, _split(scope), owner)
    out.print(f"token {t['id']} for {t['owner']} ({', '.join(t['scopes'])}):", highlight=False)
    print(t["token"])


@token_app.command("list")
def token_list(server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """List tokens (never their secrets)."""
    with remote(server, token) as client:
        items = client.tokens()
    table = Table()
    for col in ("id", "name", "owner", "prefix", "scopes", "created", "last used", "revoked"):
        table.add_column(col)
    for t in items:
        table.add_row(
            t["id"],
            t["name"],
            t["owner"],
            t["prefix"] + "...",
            ",".join(t["scopes"]),
            t["created_at"][:19],
            (t["last_used_at"] or "")[:19],
            (t["revoked_at"] or "")[:19],
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: str, server: str | None = SERVER, token: str | None = TOKEN) -> None:
    """Revoke a token (it stops working within seconds on every server)."""
    with remote(server, token) as client:
        client.revoke_token(token_id)
    out.print(f"revoked {token_id}", highlight=False)


@token_app.command("admin")
def token_admin(server: str | None = SERVER) -> None:
    """Print the admin token of the `kiln up` on this machine (for curl: -H "Authorization: Bearer ...")."""
    from service.client import local_admin_token
    from service.local import default_server

    found = local_admin_token(server or default_server())
    if not found:
        console.print(
            "[red]error:[/red] no admin token here: no `kiln up` of this user is running with "
            "authentication on, and there is no .kiln/admin-token (KILN_DATA_DIR) in this directory",
            highlight=False,
        )
        raise typer.Exit(1)
    print(found)
