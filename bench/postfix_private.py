"""A private Postfix instance whose smtpd puts every message on hold, and smtp-sink.

Purpose: the baseline of bench/intake.py.  Postfix runs from its own config_directory
and queue_directory under a temporary directory (``postfix -c DIR start``): one smtpd
on 127.0.0.1:PORT and only the internal services that receiving needs (cleanup,
trivial-rewrite, qmgr, bounce/defer/trace, anvil, proxymap, showq).  Every message is
put on hold (``check_recipient_access static:HOLD``) after cleanup has fsync'ed its
queue file -- Postfix's default before it answers 250 -- and no delivery agent exists,
so nothing is delivered: a message that left the hold queue would sit in deferred/
and fail the check.  ``held()`` counts the files in hold/, and ``check()`` says what
is wrong if any other queue has a file or the instance listens beyond its one port.
With ``tls`` (certificate, key) smtpd offers STARTTLS (TLS 1.2+, tlsmgr for tickets).

Security: run as root (master binds and drops to the postfix user).  The system
instance (/etc/postfix, /var/spool/postfix) is never read for writing nor started:
every command gets ``-c`` with the private directory.

Diagnostics: RigError with Postfix's own last line when it does not start (without
/dev/log Postfix logs nowhere; ``maillog`` writes its log to DIR/maillog through
postlogd, which costs CPU, so it is off for measurements).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from benchrig import RigError, free_port, tree_listeners, wait_for, wait_serving

POSTFIX = "/usr/sbin/postfix"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
QUEUES = ("incoming", "active", "deferred", "maildrop", "corrupt", "hold")

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-smapq-bench
myhostname = bench.smapq.invalid
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = check_recipient_access static:HOLD
"""

# No inet service but ours, no pickup (nothing is posted locally), no delivery agent.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0   cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - -   trivial-rewrite
bounce    unix  - - n - 0   bounce
defer     unix  - - n - 0   bounce
trace     unix  - - n - 0   bounce
anvil     unix  - - n - 1   anvil
proxymap  unix  - - n - -   proxymap
showq     unix  n - n - -   showq
"""
POSTLOG_CF = "postlog   unix-dgram n - n - 1 postlogd\n"
# STARTTLS as a 2026 MX runs it: opportunistic, TLS 1.2+, Postfix's defaults otherwise
# (session tickets on: smtpd_tls_session_cache_timeout 3600s; tlsmgr keeps the keys).
TLS_CF = """\
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_tls_protocols = >=TLSv1.2
smtpd_tls_loglevel = 0
"""
TLSMGR_CF = "tlsmgr    unix  - - n 1000? 1 tlsmgr\n"


def version() -> str:
    done = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "?"


def _files(directory: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(directory))


class PrivatePostfix:
    """A running private Postfix instance under ``workdir`` (created, then removed)."""

    name = "postfix"

    def __init__(
        self, workdir: Path, maillog: bool = False, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.workdir = workdir
        self.etc = workdir / "etc"
        self.queue = workdir / "queue"
        data = workdir / "data"
        for d in (self.etc, self.queue, data):
            d.mkdir(parents=True)
        workdir.chmod(0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(data, pw.pw_uid, pw.pw_gid)  # master's lock file; postfix-script does not fix it
        self.port = free_port()
        main = MAIN_CF.format(queue=self.queue, data=data)
        master = MASTER_CF.format(port=self.port)
        if tls is not None:
            main += TLS_CF.format(cert=tls[0], key=tls[1])
            master += TLSMGR_CF
        if maillog:
            main += f"maillog_file = {workdir / 'maillog'}\n"
            master += POSTLOG_CF
        (self.etc / "main.cf").write_text(main)
        (self.etc / "master.cf").write_text(master)
        self._postfix("start")
        try:
            pid_file = self.queue / "pid" / "master.pid"
            wait_for(pid_file.exists, 30, "postfix master wrote no pid file")
            self.pid = int(pid_file.read_text().split()[0])
            wait_serving(self.pid, self.port, self._alive, "postfix master")
            listens = tree_listeners(self.pid)
            if listens != {f"tcp 127.0.0.1:{self.port}"}:
                raise RigError(f"private postfix listens on {sorted(listens)}")
        except (RigError, ValueError, OSError) as exc:
            self.stop()
            raise RigError(f"private postfix: {exc}") from None

    def _alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"

    def _postfix(self, verb: str) -> None:
        done = subprocess.run(
            [POSTFIX, "-c", str(self.etc), verb], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message (see -maillog)"])[-1]
            raise RigError(f"postfix -c {self.etc} {verb}: {why}")

    def held(self) -> int:
        """Messages in the hold queue (one file each; hold/ is not hashed)."""
        return _files(self.queue / "hold")

    def check(self, expected: int) -> str | None:
        """None if exactly ``expected`` messages are held and nothing is elsewhere."""
        counts = {q: _files(self.queue / q) for q in QUEUES}
        if counts["hold"] != expected or any(n for q, n in counts.items() if q != "hold"):
            return f"postfix queues {counts}, expected {expected} held"
        return None

    def idle(self, timeout: float = 60) -> None:
        """smtpd and cleanup finish before the 250; nothing to wait for."""

    def stop(self) -> None:
        """``postfix stop``, then wait until master and its children are gone."""
        if not hasattr(self, "pid"):
            with contextlib.suppress(RigError):
                self._postfix("stop")
            return
        if self._alive():
            self._postfix("stop")
            wait_for(lambda: not self._alive(), 60, "postfix master did not stop")


class SmtpSink:
    """Postfix's smtp-sink: the protocol-only ceiling (stores nothing)."""

    name = "sink"

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        for _ in range(4):
            self.port = free_port()
            argv = [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{self.port}", "1024"]
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            self.pid = self.proc.pid
            try:
                wait_serving(self.pid, self.port, lambda: self.proc.poll() is None, "smtp-sink")
                return
            except RigError:
                self.stop()
        raise RigError("smtp-sink did not start on 4 ports")

    def check(self, expected: int) -> str | None:
        return None

    def idle(self, timeout: float = 60) -> None:
        """smtp-sink has no children."""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(60)
        if self.proc.stderr:
            self.proc.stderr.close()


def install() -> None:
    """Install Debian's postfix (smtp-source, smtp-sink) without starting the system one.

    debconf "No configuration" leaves /etc/postfix unconfigured; a policy-rc.d that
    answers 101 stops the maintainer scripts from starting the daemon.
    """
    if os.geteuid() != 0:
        raise RigError("postfix is not installed and only root can install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        text=True,
        check=True,
    )
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        for argv in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postfix"],
        ):
            done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                why = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise RigError(f"{' '.join(argv)} failed: {why}")
    finally:
        if ours:
            policy.unlink()
