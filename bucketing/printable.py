"""The one escaping function for everything printed from user data (file names, captions,
error details) by any command or warning: nothing a file name holds acts on a terminal."""

from __future__ import annotations

# Characters that would act on a terminal instead of being shown: C0 and C1 controls (ESC
# starts ANSI/OSC sequences, a newline could forge a report line), DEL, line and paragraph
# separators and the bidirectional overrides that reorder what follows them.
_UNSAFE = [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x200E, 0x200F,
           *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = str.maketrans({
    c: {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(c, f"\\x{c:02x}" if c < 0x100 else
                                                    f"\\u{c:04x}")
    for c in _UNSAFE
})


def escape(text: str) -> str:
    """``text`` safe to print: control, line-separator and bidi characters as ``\\n``,
    ``\\x1b``, ``\\u202e``...; undecodable bytes of non-UTF-8 names as U+FFFD."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace") \
        .translate(_ESCAPES)
