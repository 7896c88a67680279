"""The access policy of the netperm-table: which mail smap takes, from whom, for whom.

Purpose: turn the ``smap: domains``, ``smap: recipients`` and ``smap: rule`` lines
into a ``Policy``: precompiled structures (sets, suffix tuples, integer networks,
split globs) built once per process start (inetd: per connection; serve: per reload),
so the decision at each RCPT (smapq.intake.policy) is set lookups and string
compares.  The syntax, FWTK-style one line per rule, in table order:

    smap: domains example.com .example.com /usr/local/etc/smap-domains
    smap: recipients /usr/local/etc/smap-recipients
    smap: rule allow|deny|noto CLIENT SENDER RECIPIENT

- ``domains``: names and files (absolute paths: one name per line, ``#`` comments).
  ``example.com`` is that domain only; ``.example.com`` is every subdomain of it
  (Postfix's ``.domain`` form); a name is matched without case and without a
  trailing dot.  Several ``domains`` lines add up.
- ``recipients``: a file of the valid recipients of those domains, one per line: a
  local part (``alice``: alice at every domain of ``domains``) or an address
  (``bob@example.com``).  Needs ``domains``; postmaster is always valid (RFC 5321
  4.5.1).
- ``rule``: the Obtuse smtpd check_rules actions.  CLIENT is ``*``, an address or a
  CIDR network (IPv4 or IPv6; an IPv4-mapped IPv6 client is matched as IPv4), or
  several of them joined by commas.  SENDER and RECIPIENT are ``*`` or patterns of
  the whole address, without case, where ``*`` is any run of characters
  (``*@example.org``, ``*@*.example.org``, ``*%*@*``); ``<>`` is the null sender.

Security: a pattern that cannot match an address (no ``@``), a network with host bits
set or an unknown action is a configuration error, not a rule that silently never
applies.  The domains and recipients files are read before the jail, by whoever
reads the table (root, for smap); they need not be inside the spool.

Standards: RFC 5321 4.5.1 (postmaster), 2.3.5 (domain names are case-insensitive);
Obtuse smtpd check_rules (first match wins; no match = allow); Postfix cidr_table
(first match wins, host bits must be zero).

Diagnostics: every problem is a ``ConfigError`` naming ``file:line`` and the keyword
(for a bad line in a domains or recipients file: that file's line).

Lean: stdlib only, no ``re``; imported only when a policy keyword is set.  Addresses
are parsed with ``_socket.inet_pton`` (the C module: ``socket`` would import enum).
"""

from __future__ import annotations

from _socket import AF_INET, AF_INET6, inet_pton

from smapq.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from smapq.config.netperm import Rule

ALLOW = 0
DENY = 1
NOTO = 2
ACTIONS = {"allow": ALLOW, "deny": DENY, "noto": NOTO}
ACTION_NAMES = ("allow", "deny", "noto")

KEYWORDS = ("domains", "recipients", "rule")

_MAPPED = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96, IPv4-mapped IPv6 (RFC 4291 2.5.5.2)


def client_address(text: str) -> tuple[int, int] | None:
    """(bits, value) of a client address: 32 for IPv4 (mapped IPv6 too), 128 for IPv6.

    None for anything else (an unknown peer, a UNIX socket): only ``*`` matches it.
    """
    text = text.partition("%")[0]  # an IPv6 zone says which link, not who
    try:
        if ":" not in text:
            return 32, int.from_bytes(inet_pton(AF_INET, text), "big")
        raw = inet_pton(AF_INET6, text)
    except (OSError, ValueError):
        return None
    if raw[:12] == _MAPPED:
        return 32, int.from_bytes(raw[12:], "big")
    return 128, int.from_bytes(raw, "big")


class Network:
    """One CLIENT network: ``bits`` wide, ``prefix`` leading bits of ``value``."""

    __slots__ = ("bits", "mask", "value")

    def __init__(self, bits: int, value: int, prefix: int) -> None:
        self.bits = bits
        self.mask = ((1 << prefix) - 1) << (bits - prefix)
        self.value = value

    def __contains__(self, client: tuple[int, int]) -> bool:
        return client[0] == self.bits and client[1] & self.mask == self.value


def parse_network(text: str) -> Network:
    """``192.0.2.0/24``, ``2001:db8::/32``, ``::ffff:192.0.2.0/120`` or an address."""
    addr, slash, length = text.partition("/")
    parsed = client_address(addr) if "%" not in addr else None
    if parsed is None:
        raise ValueError(f"{text!r} is not an IP address or CIDR network")
    bits, value = parsed
    if slash:
        if not length.isdigit() or len(length) > 3:
            raise ValueError(f"{text!r}: bad prefix length {length!r}")
        prefix = int(length)
        if ":" in addr and bits == 32:  # an IPv4-mapped network: its IPv4 prefix
            prefix -= 96
            if prefix < 0:
                raise ValueError(f"{text!r}: an IPv4-mapped network needs a prefix of 96..128")
        if prefix > bits:
            raise ValueError(f"{text!r}: prefix longer than {bits} bits")
    else:
        prefix = bits
    net = Network(bits, value, prefix)
    if value & ~net.mask:
        raise ValueError(f"{text!r} has host bits set (Postfix cidr_table refuses it too)")
    return net


class Glob:
    """A case-insensitive pattern of a whole address; ``*`` is any run of characters."""

    __slots__ = ("parts", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.parts = tuple(text.lower().split("*"))

    def match(self, value: str) -> bool:
        parts = self.parts
        value = value.lower()
        if len(parts) == 1:
            return value == parts[0]
        first, last = parts[0], parts[-1]
        if len(value) < len(first) + len(last):
            return False
        if not value.startswith(first) or not value.endswith(last):
            return False
        pos, end = len(first), len(value) - len(last)
        for part in parts[1:-1]:
            found = value.find(part, pos, end)
            if found < 0:
                return False
            pos = found + len(part)
        return True


def parse_pattern(text: str, sender: bool) -> Glob | None:
    """None for ``*`` (anything); else a Glob of a whole address."""
    if text == "*":
        return None
    if sender and text == "<>":
        return Glob("")
    if "@" not in text:
        what = "sender" if sender else "recipient"
        null = ", <>" if sender else ""
        raise ValueError(f"{what} pattern {text!r} has no '@' (use *{null} or *@domain)")
    return Glob(text)


class AccessRule:
    """One ``smap: rule`` line, compiled; ``where`` (file:line) names it in events."""

    __slots__ = ("action", "clients", "recipient", "sender", "text", "where")

    def __init__(
        self,
        where: str,
        action: int,
        clients: tuple[Network, ...] | None,
        sender: Glob | None,
        recipient: Glob | None,
        text: str,
    ) -> None:
        self.where = where
        self.action = action
        self.clients = clients  # None: any client, known or not
        self.sender = sender  # None: any sender
        self.recipient = recipient  # None: any recipient
        self.text = text


def parse_rule(rule: Rule) -> AccessRule:
    """A ``smap: rule ACTION CLIENT SENDER RECIPIENT`` line; ConfigError naming it."""
    if len(rule.args) != 4:
        raise rule.error(
            f"takes ACTION CLIENT SENDER RECIPIENT (4 arguments), got {len(rule.args)}"
        )
    action, client, sender, recipient = rule.args
    code = ACTIONS.get(action.lower())
    if code is None:
        raise rule.error(f"unknown action {action!r} (allow, deny or noto)")
    try:
        clients = None if client == "*" else tuple(map(parse_network, client.split(",")))
        compiled = AccessRule(
            f"{rule.path}:{rule.line}",
            code,
            clients,
            parse_pattern(sender, True),
            parse_pattern(recipient, False),
            " ".join(rule.args),
        )
    except ValueError as exc:
        raise rule.error(str(exc)) from None
    return compiled


def _domain(text: str) -> str:
    """A domain name as matched: lower case, no trailing dot; ValueError if not one."""
    name = text.lower().rstrip(".")
    body = name[1:] if name.startswith(".") else name
    if not body or len(body) > 253 or not all(_label(p) for p in body.split(".")):
        raise ValueError(f"{text!r} is not a domain name (or .domain for its subdomains)")
    return name


def _label(part: str) -> bool:
    if not part or len(part) > 63 or part[0] == "-" or part[-1] == "-":
        return False
    return all(c.isalnum() or c in "-_" or ord(c) > 127 for c in part)


class _ListFile:
    """The words of a domains or recipients file, one per line, ``#`` comments.

    Read per connection under inetd, so the common case is a few C-level string
    operations over the whole text; line numbers are found only for an error.
    """

    __slots__ = ("addresses", "keyword", "lines", "path", "words")

    def __init__(self, path: str, rule: Rule) -> None:
        self.path = path
        self.keyword = rule.keyword
        try:
            with open(path, encoding="utf-8", errors="strict") as fh:
                text = fh.read()
        except OSError as exc:  # named by the table line that refers to it
            raise rule.error(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise rule.error(f"{path}: not UTF-8 text ({exc.reason})") from None
        text = text.lower()  # names and recipients are matched without case
        if "#" in text:
            text = "\n".join(line.partition("#")[0] for line in text.split("\n"))
        self.lines = text.splitlines()
        self.words = text.split()
        self.addresses = [w for w in self.words if "@" in w] if "@" in text else []
        if " " in text or "\t" in text or "\f" in text or "\v" in text:
            for number, line in enumerate(self.lines, start=1):
                if len(line.split()) > 1:
                    raise ConfigError("one name per line", path, number, self.keyword)

    def error(self, word: str, message: str) -> ConfigError:
        """A ConfigError naming the line ``word`` is on."""
        number = next((n for n, line in enumerate(self.lines, start=1) if line.strip() == word), 0)
        return ConfigError(message, self.path, number, self.keyword)


class Policy:
    """The compiled policy; ``None`` fields were not configured."""

    __slots__ = (
        "domains",
        "domains_where",
        "local_parts",
        "parents",
        "recipients",
        "recipients_where",
        "rules",
    )

    def __init__(self) -> None:
        self.domains: frozenset[str] | None = None  # exact names
        self.parents: tuple[str, ...] = ()  # ".example.com": its subdomains
        self.domains_where = ""
        self.recipients: frozenset[str] | None = None  # full addresses
        self.local_parts: frozenset[str] = frozenset()  # at every domain
        self.recipients_where = ""
        self.rules: tuple[AccessRule, ...] = ()

    def ours(self, domain: str) -> bool:
        """Is ``domain`` one smap accepts mail for?"""
        assert self.domains is not None
        domain = domain.lower().rstrip(".")
        return domain in self.domains or domain.endswith(self.parents)


def _add_domains(policy: Policy, rules: list[Rule]) -> None:
    names: set[str] = set()
    parents: set[str] = set()
    for rule in rules:
        if not rule.args:
            raise rule.error("takes domain names or files (absolute paths)")
        for arg in rule.args:
            listed = _ListFile(arg, rule) if arg.startswith("/") else None
            for word in listed.words if listed else (arg,):
                try:
                    name = _domain(word)
                except ValueError as exc:
                    raise (
                        listed.error(word, str(exc)) if listed else rule.error(str(exc))
                    ) from None
                (parents if name.startswith(".") else names).add(name)
    policy.domains = frozenset(names)
    policy.parents = tuple(sorted(parents))
    policy.domains_where = f"{rules[0].path}:{rules[0].line}"


def _add_recipients(policy: Policy, rule: Rule) -> None:
    if len(rule.args) != 1 or not rule.args[0].startswith("/"):
        raise rule.error("takes one argument, the absolute path of a file")
    listed = _ListFile(rule.args[0], rule)
    words = listed.words  # lower case already
    addresses = listed.addresses
    local = set(words).difference(addresses) if addresses else set(words)
    full: set[str] = set()
    for word in addresses:
        lp, _, domain = word.rpartition("@")
        # Not the domain syntax check of smap: domains: an entry that is no address
        # simply never matches, and a large file is read on every inetd connection.
        if not lp or not domain.rstrip("."):
            raise listed.error(word, f"{word!r} is not local@domain")
        full.add(f"{lp}@{domain.rstrip('.')}")
    policy.recipients = frozenset(full)
    policy.local_parts = frozenset(local)
    policy.recipients_where = f"{rule.path}:{rule.line}"


def build(rules: Iterable[Rule]) -> Policy | None:
    """The policy of smap's policy lines (in table order), or None if there are none."""
    by_keyword: dict[str, list[Rule]] = {k: [] for k in KEYWORDS}
    for rule in rules:
        if rule.keyword in by_keyword:
            by_keyword[rule.keyword].append(rule)
    if not any(by_keyword.values()):
        return None
    policy = Policy()
    if by_keyword["domains"]:
        _add_domains(policy, by_keyword["domains"])
    recipients = by_keyword["recipients"]
    if recipients:
        if policy.domains is None:
            raise recipients[0].error(
                "needs smap: domains (the recipients file lists who is valid in them)"
            )
        _add_recipients(policy, recipients[0])  # FWTK: the first line wins
    policy.rules = tuple(parse_rule(r) for r in by_keyword["rule"])
    return policy
