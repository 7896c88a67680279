"""The access decision at RCPT: may this client send this sender's mail to this address?

Purpose: one pure function, ``decide``, over the precompiled ``Policy`` of the
netperm-table (smapq.config.policy), the same on both transports.  The order:

1. ``smap: rule`` lines, in table order, first match wins (Obtuse smtpd's
   check_rules): ``allow`` accepts the recipient (and skips 2 and 3: a network
   allowed to relay, like Postfix's permit_mynetworks); ``noto`` refuses this
   recipient (550 5.7.1) and nothing else; ``deny`` refuses it (554 5.7.1) and
   denies the session: the transaction is dropped and every later MAIL gets 554
   5.7.1 (check_rules ended the session; RFC 5321 4.1.1.10 lets only 421 close
   it, so here the client keeps talking to a wall and the error limit ends it).
2. no rule matched: ``smap: domains`` -- an address outside them, or one that routes
   on (``%``, ``!`` or a second ``@`` in the local part: Postfix's sender-specified
   routing), gets 550 5.7.1; a bare ``postmaster`` is ours (RFC 5321 4.5.1).
3. ``smap: recipients`` -- an address of our domains that is not listed gets
   550 5.1.1; postmaster is always valid.
4. otherwise: accepted (check_rules' default).

Every decision names its reason in the event detail, ``policy FILE:LINE WHAT``:
WHAT is allow, deny, noto, "domains", "recipients" (accepted by those lines),
"domains: relay access denied", "domains: sender-specified routing" or
"recipients: user unknown" (refused), and ``policy default`` when nothing decided.
The detail is the same for every refusal by one rule, so ``smapq report refused
--by rule`` groups by it.

Decided at RCPT, also for a rule that names only the client (Postfix's
smtpd_delay_reject = yes): the log then holds the sender and recipient the refused
client tried, and a client that is refused everything still hears the reason.

Security: the client address comes from the kernel (getpeername), never from the
client's words; sender and recipient passed smapq.smtp.address first.

Lean: stdlib only, no I/O.
"""

from __future__ import annotations

from smapq.config.policy import ALLOW, NOTO, client_address
from smapq.smtp import replies as R

TYPE_CHECKING = False
if TYPE_CHECKING:
    from smapq.config.policy import Policy

    Client = tuple[int, int] | None

_ROUTING = ("%", "!", "@")


def client_of(addr: str) -> Client:
    """The client address as rules match it (once per connection)."""
    return client_address(addr) if addr else None


def decide(policy: Policy, client: Client, sender: str, rcpt: str) -> tuple[bytes, str, bool]:
    """(reply, detail, deny) for RCPT ``rcpt``: reply b"" accepts the recipient.

    ``sender`` is "" for the null sender; ``rcpt`` is the mailbox as the session
    stores it (``postmaster`` bare, else local@domain).
    """
    shown = b"<" + rcpt.encode("utf-8", "replace") + b">"
    for rule in policy.rules:
        if rule.clients is not None and (
            client is None or not any(client in net for net in rule.clients)
        ):
            continue
        if rule.sender is not None and not rule.sender.match(sender):
            continue
        if rule.recipient is not None and not rule.recipient.match(rcpt):
            continue
        if rule.action == ALLOW:
            return b"", f"policy {rule.where} allow", False
        if rule.action == NOTO:
            return R.R550_NOTO % shown, f"policy {rule.where} noto", False
        return R.R554_DENIED % shown, f"policy {rule.where} deny", True
    local, at, domain = rcpt.rpartition("@")
    postmaster = (local if at else domain).lower() == "postmaster"
    if policy.domains is not None:
        where = policy.domains_where
        if not at:
            if not postmaster:  # the session only lets bare postmaster through
                return R.R550_RELAY_DENIED % shown, f"policy {where} domains: no domain", False
        elif not policy.ours(domain):
            return (
                R.R550_RELAY_DENIED % shown,
                f"policy {where} domains: relay access denied",
                False,
            )
        elif any(c in local for c in _ROUTING):
            return (
                R.R550_RELAY_DENIED % shown,
                f"policy {where} domains: sender-specified routing",
                False,
            )
        if policy.recipients is None:
            return b"", f"policy {where} domains", False
    if policy.recipients is not None:
        where = policy.recipients_where
        lp = local.lower()
        full = f"{lp}@{domain.lower().rstrip('.')}"
        if postmaster or full in policy.recipients or lp in policy.local_parts:
            return b"", f"policy {where} recipients", False
        return R.R550_UNKNOWN_RCPT % shown, f"policy {where} recipients: user unknown", False
    return b"", "policy default", False
