"""What looks like a credential in a shard location, and `redact`, which masks it in every message.

`bcc.remote` owns locations; this module owns the one list of secret-looking forms (URL userinfo, signed
query values, `NAME=value` assignments, `--password value` flags, `user:password` options, Authorization
headers, bearer tokens) that `redact` masks and `bcc.remote.check_no_secrets` refuses, so that no secret
reaches config.yaml, a manifest or a log; and `quote_bytes`, the one way a message shows bytes that came
back instead of a shard (an error page, an AccessDenied body), masked the same way.
"""

from __future__ import annotations

import os
import re
import urllib.parse

__all__ = ["TOKEN_ENV", "quote_bytes", "redact", "remember"]

TOKEN_ENV = "BCC_HTTP_TOKEN"
_EXPANDED: dict[str, str] = {}  # value -> "${NAME}" of every variable `bcc.remote.expand_env` read


def remember(value: str, ref: str) -> None:
    """Show `ref` (`${NAME}`) wherever `redact` meets `value`, the variable's value."""
    _EXPANDED[value] = ref


# The one list of what looks like a secret: query parameters, `NAME=value` assignments and `--flag value`s in a
# `pipe:` command (`env AWS_SECRET_ACCESS_KEY=...`, `--password ...`), Authorization-like headers. An ID is not one.
_SECRET_PARAM = re.compile(r"(sig|signature|token|secret|password|passwd|passphrase|pwd|key|credential|auth|session)"
                           r"(?![_-]?id$)|pass$|(?:^|[_-])pass(?:[_-]|$)", re.I)  # SSHPASS, RCLONE_X_PASS, ?pwd=
_SWITCHES = ("true", "false", "yes", "no", "on", "off")  # rclone's env_auth=true says where a secret is, holds none
# a value ends at a comma that starts another NAME= (rclone's `:s3,access_key_id=...,secret_access_key=...:`)
_ASSIGN = re.compile(r"(?<![?&\w.$-])(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>[^\s'\"$&;|,]"
                     r"(?:[^\s'\"&;|,]|,(?![A-Za-z_]\w*=))*)")
_QUOTED = r"'(?!\$\{)[^']*'|\"(?!\$\{)[^\"]*\""  # a quoted value, unless it is a ${VAR}
# (rclone's --webdav-pass, --azureblob-key, --sftp-pass too; not an ID, a file or a path: --sftp-key-file)
_FLAG = re.compile(r"(?P<flag>\s--?[A-Za-z0-9_-]*(?:password|passwd|pass(?![a-z])|pwd|token|secret|api[-_]?key|"
                   r"account[-_]?key|access[-_]?key|[a-z0-9][-_]key(?![a-z])|credential|cookie|bearer)[A-Za-z0-9_-]*)"
                   r"(?<![-_]id)(?<![-_]file)(?<![-_]path)"
                   rf"(?P<gap>=|\s+)(?P<value>{_QUOTED}|[^\s'\"$-][^\s'\"]*)", re.I)
_HEADER = re.compile(r"(?P<head>\b(?:Authorization|Proxy-Authorization|X-Api-Key|Api-Key|Private-Token|Cookie)\s*:\s*"
                     r"(?:(?:Bearer|Basic|Token)\s+|(?!(?:Bearer|Basic|Token)\b)))(?P<value>[^\s'\"$][^\s'\"]*)", re.I)
# any header named like a credential given to curl/wget (-H 'X-Secret: ...', --header=...)
_HEADER_FLAG = re.compile(r"(?P<head>\s(?:-H|--header)(?:=|\s*)['\"]?[A-Za-z0-9-]*(?:auth|token|secret|key|pass|pwd|"
                          r"cookie|signature|credential|session)[A-Za-z0-9-]*\s*:\s*(?:(?:Bearer|Basic|Token)\s+)?)"
                          r"(?P<value>(?!\*\*\*|(?:Bearer|Basic|Token)\s)[^\s'\"$][^\s'\"]*)", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"]+)@")
# (a value stops before the colon of a message's `URL: reason`)
# query parameters that carry a credential under a name the pattern above cannot take (it would match
# `encoding`, `barcode`): Azure Functions' `code`, a JWT or SAS passed whole, HMAC and one-time codes
_QUERY_SECRET_NAMES = {"code", "jwt", "sas", "hmac", "otp", "access", "ticket", "apikey", "api_key"}
# a JSON Web Token by its shape, whatever it is called: base64url of '{"' twice, then the signature
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&])(?P<name>[^=&#\s'\"]+)=(?P<value>[^&#\s'\"]*?)(?=:?(?:[&#\s'\"]|$))")
# a user:password (curl -u/-U/-E/--user/--proxy-user/--cert, also -uNAME:PW and -su ...), lftp's
# user,password, smbclient's user%password
_USER_FLAG = re.compile(r"(?P<flag>\s(?:-[A-Za-z]{0,3}[uUE]|--user|--proxy-user|--cert))(?P<gap>=|\s*)"
                        r"(?P<value>'[^']*?[:,%](?!\$)[^']+'|\"[^\"]*?[:,%](?!\$)[^\"]+\"|"  # ${USER}:password too
                        r"(?:\$\{\w+\}|[^\s'\"$:,%-][^\s'\":,%]*)[:,%](?!\$)[^\s'\"]+)")
# sshpass -p PASSWORD / -pPASSWORD (sshpass -e reads $SSHPASS instead), after any of its other options
_SSHPASS = re.compile(rf"(?P<flag>\bsshpass(?:\s+-[vVh]|\s+-[PfdD]\s*\S+)*\s+-p)(?P<gap>\s*)"
                      rf"(?P<value>{_QUOTED}|[^\s'\"$-][^\s'\"]*)")
# short flags whose meaning depends on the tool: curl -b (--cookie) with a NAME=value (a bare -b FILE is a cookie
# file), swift -K/--key, ossutil -k (--access-key-secret); not curl -k (--insecure), -K (--config) or --key FILE
_TOOL_FLAG = re.compile(rf"(?P<flag>(?:\bcurl\b[^|;&]*?\s-[A-Za-z]*b(?=\s*['\"]?[^\s'\"$-][^\s'\"=]*=)|"
                        rf"\bswift\b[^|;&]*?\s(?:-K|--key)|\bossutil\b[^|;&]*?\s-k))(?P<gap>=|\s*)"
                        rf"(?P<value>{_QUOTED}|[^\s'\"$-][^\s'\"]*)")
# MinIO's client takes the secret key as a positional: mc alias set ALIAS URL ACCESS_KEY SECRET_KEY (older:
# mc config host add ...); the access key is an ID
_MC_ALIAS = re.compile(rf"(?P<flag>\bmc\b[^|;&]*?\s(?:alias\s+set|config\s+host\s+add)(?:\s+(?!-)\S+){{3}}\s+)"
                       rf"(?P<gap>)(?P<value>{_QUOTED}|[^\s'\"$-][^\s'\"]*)")
_BEARER = re.compile(r"\b(?P<word>Bearer|Basic|token)(?P<gap>[ =:]+)(?P<value>[A-Za-z0-9._~+/=-]{8,})", re.I)


def redact(text: str) -> str:
    """`text` with credentials masked: URL userinfo (`***@`), the values of query parameters whose name
    suggests a secret (`X-Amz-Signature=***`, `token=***`, `code=***`), JSON Web Tokens by their shape,
    bearer/basic tokens, `$BCC_HTTP_TOKEN`'s
    value, and the values of the `${VAR}`s `expand_env` read (shown as `${VAR}`)."""
    if not text:
        return text
    for value, ref in sorted(_EXPANDED.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(value, ref)
    token = os.environ.get(TOKEN_ENV, "")
    if len(token) >= 4:
        text = text.replace(token, "***")
    text = _USERINFO.sub(lambda m: m.group("scheme") + ("***@" if not m.group("info").startswith("${") else
                                                        m.group("info") + "@"), text)
    text = _JWT.sub("***", text)  # (a percent-encoded one: `_QUERY_PARAM` below decodes a value to look)

    def secret_param(name: str, value: str) -> bool:  # percent-decoded: `c%6Fde=` is `code=`
        name = urllib.parse.unquote(name)
        return bool(_SECRET_PARAM.search(name) or name.lower() in _QUERY_SECRET_NAMES
                    or _JWT.search(urllib.parse.unquote(value)))

    text = _QUERY_PARAM.sub(lambda m: m.group(0) if not secret_param(m.group("name"), m.group("value"))
                            else f"{m.group('sep')}{m.group('name')}=***", text)
    text = _ASSIGN.sub(lambda m: m.group(0) if not _SECRET_PARAM.search(m.group("name"))
                       or m.group("value").lower() in _SWITCHES else f"{m.group('name')}=***", text)
    text = _FLAG.sub(lambda m: f"{m.group('flag')}{m.group('gap')}***", text)
    text = _USER_FLAG.sub(lambda m: f"{m.group('flag')}{m.group('gap')}***", text)  # curl -u user:password
    text = _TOOL_FLAG.sub(lambda m: f"{m.group('flag')}{m.group('gap')}***", text)
    text = _SSHPASS.sub(lambda m: f"{m.group('flag')}{m.group('gap')}***", text)
    text = _MC_ALIAS.sub(lambda m: f"{m.group('flag')}***", text)
    text = _HEADER.sub(lambda m: f"{m.group('head')}***", text)
    text = _HEADER_FLAG.sub(lambda m: f"{m.group('head')}***", text)
    return _BEARER.sub(lambda m: f"{m.group('word')}{m.group('gap')}***", text)


_BASE64 = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{8,}={0,2}(?![A-Za-z0-9+/=])")


def _is_userinfo(token: str) -> bool:
    """Whether `token` is the base64 of a `user:password` (what an HTTP Basic Authorization header holds)."""
    import base64
    import binascii

    try:
        plain = base64.b64decode(token + "=" * (-len(token) % 4), validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return ":" in plain and plain.isprintable()


def quote_bytes(data: bytes, limit: int = 100) -> str:
    """The start of `data` as a message may quote it: printable ASCII (any other byte `.`, a run of blanks
    one space), credentials masked (`redact`, before shortening: a cut cannot split a secret out of
    reach), at most `limit` characters and `...`; repr-quoted (`'<html><body>AccessDenied...'`)."""
    text = re.sub(r"\s+", " ", data[:4096].decode("latin-1"))
    text = redact("".join(c if " " <= c <= "~" else "." for c in text).strip())
    text = _BASE64.sub(lambda m: "***" if _is_userinfo(m.group()) else m.group(), text)  # a page echoing Basic auth
    return repr(text[:limit] + "..." if len(text) > limit or len(data) > 4096 else text)


_SIGNATURES = {"x-amz-signature", "x-goog-signature", "signature", "sig"}  # S3, GCS, CloudFront, Azure SAS


def is_signed(url: str) -> bool:
    """Whether `url` carries its own signature in the query (a presigned URL: no token belongs with it)."""
    return any(k.lower() in _SIGNATURES for k, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
