"""One module per entry point (``ptuning-train``, ``ptuning-evaluate``, ``ptuning-export``,
``ptuning-plan``; ``launchers/*.py`` are shims over them). Every flag is generated from a config
dataclass (``args.py``); every bad input ends as one ``error: ...`` line and exit 2 (``common.py``)."""
