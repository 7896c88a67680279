"""The demo behind scripts/demo: one real message through smap and smapd.

A tiny inetd stands in for the super-server: it accepts one TCP connection on loopback
and starts the installed ``smap`` with the socket as stdin/stdout, which is all inetd
does for ``nowait`` services. smtplib sends the message. ``smapq deliver --once`` then
hands it to ``smapq-maildrop``, the project's sendmail-compatible local delivery, which
writes ``demo/Maildir``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
from email.message import EmailMessage
from pathlib import Path


def sh(venv: Path, *args: str, env: dict[str, str] | None = None) -> None:
    print(f"$ {' '.join(args)}", flush=True)
    subprocess.run([str(venv / "bin" / args[0]), *args[1:]], check=True, env=env)


def reachable_by(user: str, *paths: Path) -> bool:
    pw = pwd.getpwnam(user)
    probe = [
        "setpriv",
        f"--reuid={pw.pw_uid}",
        f"--regid={pw.pw_gid}",
        "--clear-groups",
        "test",
        "-x",
    ]
    return all(subprocess.run([*probe, str(p)], check=False).returncode == 0 for p in paths)


def write_table(venv: Path, demo: Path) -> Path:
    lines = [
        "# smapq demo table (scripts/demo); other FWTK programs' lines would be ignored",
        f"smap, smapd: directory {demo}/spool",
        f"smapd: baddir {demo}/bad",
        f"smapd: sendmail {venv}/bin/smapq-maildrop",
        "smapd: wakeup 5",
        "smap: hostname demo.smapq.invalid",
    ]
    if os.geteuid() == 0 and reachable_by("nobody", venv / "bin" / "python", demo):
        lines.insert(1, "smap, smapd: userid nobody")
        print("root: smap will chroot into demo/spool and run as nobody")
    else:
        lines.insert(1, "smap: jail off")
        print("not root (or demo/ unreachable for nobody): the table turns the jail off")
    table = demo / "netperm-table"
    table.write_text("\n".join(lines) + "\n")
    table.chmod(0o600)
    return table


def mini_inetd(smap: str, table: Path, listener: socket.socket) -> None:
    conn, _ = listener.accept()
    with conn:
        env = {"PATH": "/usr/bin:/bin", "SMAPQ_TABLE": str(table)}
        subprocess.run([smap], stdin=conn, stdout=conn, env=env, check=False)


def main() -> None:
    venv, demo = Path(sys.argv[1]), Path(sys.argv[2])
    if demo.exists():
        shutil.rmtree(demo)
    demo.mkdir(mode=0o755)
    table = write_table(venv, demo)
    os.environ["SMAPQ_TABLE"] = str(table)
    sh(venv, "smapq", "init")
    sh(venv, "smapq", "check-config")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = threading.Thread(
        target=mini_inetd, args=(str(venv / "bin" / "smap"), table, listener)
    )
    server.start()
    msg = EmailMessage()
    msg["From"] = "alice@example.org"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "smapq demo"
    msg.set_content("Hello from the smapq demo.\n.\nThe line above is a lone dot.\n")
    print(f"$ smtplib -> 127.0.0.1:{port} (smap spawned per connection, as inetd does)")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.set_debuglevel(1)
        client.send_message(msg)
    server.join()
    listener.close()

    maildir = demo / "Maildir"
    env = {**os.environ, "SMAPQ_MAILDIR": str(maildir)}
    if os.geteuid() == 0 and "userid nobody" in table.read_text():
        maildir.mkdir(mode=0o700)
        pw = pwd.getpwnam("nobody")
        os.chown(maildir, pw.pw_uid, pw.pw_gid)
    sh(venv, "smapq", "deliver", "--once", env=env)
    delivered = sorted((maildir / "new").iterdir())
    print(f"\n== {delivered[-1]}")
    print(delivered[-1].read_text())
    sh(venv, "smapq", "queue", "list", "--state", "delivered")
    sh(venv, "smapq", "report", "summary")
    print(f"\ndemo done: spool {demo}/spool, mail {maildir}")


if __name__ == "__main__":
    main()
