"""The host numavm runs on: system calls (declared once), memory segments and their policies,
the placement audit, child-process lifetime, the cache."""
