"""The one way loraplane compiles an untrusted regular expression: google-re2 (linear-time matching, no
backreferences or lookaround) with a bounded program size, and RE2's own reason when it refuses one.

Used for the loader gate's target_modules patterns, the trainer's `regex` evaluation records, and
spec.contentRouting rule patterns (validated by the API, run by the router)."""

from __future__ import annotations

# Program memory of one compiled RE2 (bytes) where no tighter bound applies: the loader gate, the trainer's
# evaluation records and the router's compiled rules.
RE2_MAX_MEM = 8 << 20


def compile_re2(pattern: str | bytes, max_mem: int = RE2_MAX_MEM):
    """The RE2 program of `pattern` (str: matched against str; bytes: against UTF-8 bytes), program memory at
    most `max_mem` bytes, errors not logged by RE2. Raises ValueError "RE2 refuses it (<RE2's reason>)"."""
    import re2   # late import: only code that compiles a pattern needs it (google-re2 is a package dependency)

    options = re2.Options()
    options.log_errors = False
    options.max_mem = max_mem
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise ValueError(f"RE2 refuses it ({detail})") from None
