"""File names that are not valid UTF-8, written as text that says exactly which bytes they are.

A POSIX file name is bytes. Python hands a name whose bytes are not UTF-8 to us with each
undecodable byte as a lone surrogate (``surrogateescape``: byte 0xE9 -> ``"\\udce9"``), which no
UTF-8 file (JSON manifest, record, Parquet table, HTML report) can hold. Wherever a source path
is recorded, it is written in this **escaped form**:

* each byte that is not part of valid UTF-8 becomes ``\\xNN`` (two lower-case hex digits);
* each backslash becomes ``\\\\`` (so the form can be read back without ambiguity);
* (a lone surrogate that no file name can hold, e.g. from a JSON ``\\udNNN`` escape, becomes
  ``\\udNNN``);
* everything else is kept as it is.

So ``latin\\xe9.png`` (a name with the byte 0xE9) is recorded as the 13 characters
``latin\\xe9.png``, and a name that is valid UTF-8 and has no backslash (every FFHQ name, nearly
every real one) is recorded unchanged. :func:`unescape_path` turns the recorded form back into the
name Python opens (``os.fsencode`` of it gives the original bytes).
"""

from __future__ import annotations

import re

_SURROGATE_ESCAPE = range(0xDC80, 0xDD00)  # what surrogateescape makes of the bytes 0x80..0xFF
_ESCAPE_RE = re.compile(r"\\(\\|x[89a-f][0-9a-f]|u[dD][89a-fA-F][0-9a-fA-F]{2})")


def escape_path(name: str) -> str:
    """The recorded (escaped) form of a path as Python's ``os`` functions return it."""
    if "\\" not in name and name.isascii():
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif code in _SURROGATE_ESCAPE:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:  # another lone surrogate (not from a file name): keep its code
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape_path(recorded: str) -> str:
    """The path Python opens, from its recorded form (the inverse of :func:`escape_path`)."""
    stray = re.sub(_ESCAPE_RE, "", recorded)
    if "\\" in stray:
        raise ValueError(f"{recorded!r} is not an escaped path: a backslash must start \\\\, \\xNN or \\uDNNN")

    def one(m: re.Match) -> str:
        token = m.group(1)
        if token == "\\":
            return "\\"
        return chr(0xDC00 + int(token[1:], 16)) if token[0] == "x" else chr(int(token[1:], 16))

    return _ESCAPE_RE.sub(one, recorded)
