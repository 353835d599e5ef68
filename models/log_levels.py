"""Log levels of templates and messages: 'error', 'warn' or None (docs/LOGKEYS.md, "Levels").

DeepLog raises a never-seen key when it is error level, and a burst is critical when its line is. Explicit markers
win (glog/c10 prefixes, Python logging levels, NCCL WARN); without one, the words decide, softened where the line
says it is routine (INFO), gives advice or retries.
"""

from __future__ import annotations

import re

# Explicit level markers win: glog/c10 prefixes ([E ...], E0125 ...), Python logging levels. NCCL prints WARN
# only when a call failed, so "NCCL WARN" counts as an error. Without a marker, the words decide.
_EXPLICIT_ERROR = re.compile(r"^\s*(?:\[[EF][\s\d]|[EF]\d{4}\s)|\b(?:ERROR|FATAL|CRITICAL|NCCL WARN)\b")
_EXPLICIT_WARN = re.compile(r"^\s*(?:\[W[\s\d]|W\d{4}\s)|\bWARN(?:ING)?\b|\b[A-Z]\w*Warning: ")
# an INFO marker says the program thought it routine: error words there make a warning ("NCCL INFO NET/Plugin:
# Failed to find ncclNetPlugin_v7 symbol" is NCCL falling back to its own transport; it prints WARN on failures)
_EXPLICIT_INFO = re.compile(r"^\s*(?:\[I[\s\d]|I\d{4}\s)|\b(?:INFO|DEBUG)\b")
# advice ("Failure to do this will result in ...", "... will result in indexing errors") and errors the program
# handles by retrying ("Network error (ReadTimeout), entering retry loop") are warnings, not failures
_ADVISORY = re.compile(r"(?i)\b(?:will|would|may|might|can|could) (?:result in|lead to|cause)\b|"
                       r"\bretry(?:ing)?\b|\bwill (?:be )?retr")
_RAISED = re.compile(r"\b[A-Za-z]+(?:Error|Exception)\b|\bTraceback\b")  # an exception was raised all the same
_ERROR_WORDS = re.compile(
    r"(?i)\b(?:errors?|exceptions?|traceback|fatal|abort(?:ed|ing)?|fail(?:s|ed|ure|ures|ing)?|killed|"
    r"segmentation fault|core dumped|timed out|unhandled|illegal|refused|unreachable|broken pipe|"
    r"reset by peer|out of memory|oom|corrupt(?:ed|ion)?|panic|terminate called|unrecoverable|"
    r"xid|fallen off the bus)\b"
    r"|[A-Za-z]+(?:Error|Exception)\b")
_WARN_WORDS = re.compile(
    r"(?i)\b(?:warn(?:ing|ings)?|retry(?:ing)?|retries|retried|deprecated|deprecation|slow(?:er)?|"
    r"stall(?:ed|ing)?|degraded|mismatch|lost|overflow|skipping|not found|unable|cannot|could not)\b"
    r"|[A-Za-z]+Warning\b")
# Slurm's cancellation banner ("slurmstepd: error: *** JOB 1 ON n1 CANCELLED AT ... ***") and srun's lines
# around it: a scancel, a time limit or a preemption is the scheduler doing its job, noted, not an error (stage 2
# ends an open hang with it); a node or task failure stays an error (its banner says so).
_SCHEDULER_STOP = re.compile(r"\*\*\* (?:JOB|STEP|<\*>) \S+ (?:ON \S+ )?CANCELLED AT (?!.*FAILURE)|"
                             r"^srun: (?:Job step aborted: Waiting up to|forcing job termination)")
LEVELS = (None, "warn", "error")


def log_level(text: str) -> str | None:
    """'error', 'warn' or None for a template or message."""
    if _SCHEDULER_STOP.search(text):
        return "warn"
    if _EXPLICIT_ERROR.search(text):
        return "error"
    if _EXPLICIT_WARN.search(text):
        return "warn"
    routine = _EXPLICIT_INFO.search(text) is not None
    if _ERROR_WORDS.search(text):
        return "warn" if routine or (_ADVISORY.search(text) and not _RAISED.search(text)) else "error"
    if routine:
        return None
    if _WARN_WORDS.search(text):
        return "warn"
    return None
