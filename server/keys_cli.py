"""`tracehead keys create`, `list` and `revoke`: API keys from the command line."""

from __future__ import annotations

import argparse

from server.settings import Settings
from server.store.keys import SCOPES


def add_keys_commands(commands: argparse._SubParsersAction) -> None:
    """Add the `tracehead keys` command group."""
    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)

    create = actions.add_parser("create", help="create a key and print its secret, once")
    create.add_argument("--name", required=True, help="who or what uses the key, e.g. billing-service")
    create.add_argument("--tenant", required=True, help="tenant whose judgments the key creates and reads")
    create.add_argument("--scope", dest="scopes", action="append", required=True, choices=SCOPES,
                        help="a scope the key grants; repeat it for several")
    create.set_defaults(handler=cmd_keys_create)

    listing = actions.add_parser("list", help="list keys without their secrets")
    listing.set_defaults(handler=cmd_keys_list)

    revoke = actions.add_parser("revoke", help="revoke a key; requests with it get 401 from then on")
    revoke.add_argument("key_id", help="the id that `tracehead keys list` shows")
    revoke.set_defaults(handler=cmd_keys_revoke)


def _key_store(settings: Settings):
    from server.store import create_engine_for, upgrade_database
    from server.store.keys import KeyStore

    engine = create_engine_for(settings.resolved_database_url)
    upgrade_database(engine)
    return KeyStore(engine)


def cmd_keys_create(args: argparse.Namespace, settings: Settings) -> int:
    key, secret = _key_store(settings).create(args.name, args.tenant, args.scopes)
    print(f"created key {key.id} ({key.name}) for tenant {key.tenant} with scopes {', '.join(key.scopes)}")
    print(f"secret (shown only now; store it safely): {secret}")
    return 0


def cmd_keys_list(args: argparse.Namespace, settings: Settings) -> int:
    keys = _key_store(settings).list()
    if not keys:
        print("no API keys; create one with `tracehead keys create`")
        return 0
    rows = [("ID", "NAME", "TENANT", "SCOPES", "PREFIX", "CREATED", "REVOKED")]
    rows += [(key.id, key.name, key.tenant, ",".join(key.scopes), key.prefix + "...",
              key.created_at.isoformat(timespec="seconds"),
              key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-") for key in keys]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    return 0


def cmd_keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from server.store.keys import KeyNotFoundError

    try:
        key = _key_store(settings).revoke(args.key_id)
    except KeyNotFoundError:
        raise ValueError(f"no API key has the id {args.key_id!r}; `tracehead keys list` shows the ids") from None
    print(f"revoked key {key.id} ({key.name}) at {key.revoked_at.isoformat(timespec='seconds')}")
    return 0
